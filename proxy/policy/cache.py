"""Decisions cached per (query text, role, search_path, database): a repeat is one lookup.

Swapping the policy (or environment) drops every cached decision, so a reload applies to
the next statement of every session and no stale verdict survives.

Keyed by the analysis cache's key (the template, or the text's keyed digest
`text_key`), never by the statement text, and bounded in bytes as well as entries
(`ByteLRU`): see proxy.sql.cache.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.policy.engine import DEFAULT_ENVIRONMENT, Decision, Environment, decide
from proxy.policy.model import Policy
from proxy.sql.analyzer import AnalysisError
from proxy.sql.cache import DEFAULT_CACHE_BYTES, AnalysisCache, ByteLRU, text_key
from proxy.sql.info import Analysis, StatementInfo

_Key = tuple[str | bytes, str, tuple[str, ...], str]


class PolicyCache:
    """Bounded LRU of Decisions in front of AnalysisCache + decide()."""

    __slots__ = ("_data", "_env", "_policy", "analyses", "max_bytes", "maxsize")

    def __init__(
        self,
        policy: Policy,
        *,
        env: Environment = DEFAULT_ENVIRONMENT,
        analyses: AnalysisCache | None = None,
        maxsize: int = 10_000,
        max_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._policy = policy
        self._env = env
        self.analyses = analyses if analyses is not None else AnalysisCache(maxsize)
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._data = ByteLRU(maxsize, max_bytes)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def env(self) -> Environment:
        return self._env

    def swap(self, policy: Policy | None = None, env: Environment | None = None) -> None:
        """Install a new policy and/or environment; every cached decision is dropped."""
        self._data = ByteLRU(self.maxsize, self.max_bytes)
        if policy is not None:
            self._policy = policy
        if env is not None:
            self._env = env

    def decide(
        self,
        sql: str,
        role: str,
        search_path: tuple[str, ...],
        database: str,
        prepared: Mapping[str, StatementInfo] | None = None,
    ) -> Decision:
        """Decision for ``sql``; EXECUTE strings depend on ``prepared`` and bypass the cache."""
        key = (text_key(sql), role, search_path, database)
        data = self._data
        found = data.get(key)
        if found is not None:
            data.move_to_end(key)
            return found  # type: ignore[no-any-return]
        try:
            analysis = self.analyses.analyze(sql)
        except AnalysisError:
            decision = Decision(False, f'role "{role}": statement does not parse; denied')
            data.put(key, decision, _size(key, decision))
            return decision
        # Keyed by the analysis cache's key: the template when the same statement with
        # other constants must get the same decision.
        return self.decide_keyed(
            self.analyses.last_key, analysis, role, search_path, database, prepared
        )

    def decide_keyed(
        self,
        key: str | bytes,
        analysis: Analysis,
        role: str,
        search_path: tuple[str, ...],
        database: str,
        prepared: Mapping[str, StatementInfo] | None = None,
    ) -> Decision:
        """Decision for an analysis the caller already has, cached under ``key`` (the
        analysis cache's template key), so a statement seen with other constants costs
        no second normalisation."""
        k = (key, role, search_path, database)
        data = self._data
        found = data.get(k)
        if found is not None:
            data.move_to_end(k)
            return found  # type: ignore[no-any-return]
        decision = decide(
            self._policy, role, analysis, search_path, database, env=self._env,
            prepared=prepared,
        )
        if not analysis.has_execute:
            data.put(k, decision, _size(k, decision))
        return decision

    @property
    def nbytes(self) -> int:
        """The accounted bytes of the cached decisions."""
        return self._data.nbytes

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data.resize(max_bytes)

    def __len__(self) -> int:
        return len(self._data)


def _size(key: _Key, decision: Decision) -> int:
    """Estimated bytes of one entry beyond the overhead: its strings (the template key
    is shared with the analysis cache while both hold it, counted in each)."""
    return (len(key[0]) + len(key[1]) + sum(len(p) for p in key[2]) + len(key[3])
            + len(decision.reason or ""))
