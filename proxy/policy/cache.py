"""Decisions cached per (query text, role, search_path, database): a repeat is one lookup.

Swapping the policy (or environment) drops every cached decision, so a reload applies to
the next statement of every session and no stale verdict survives.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from proxy.policy.engine import DEFAULT_ENVIRONMENT, Decision, Environment, decide
from proxy.policy.model import Policy
from proxy.sql.analyzer import AnalysisError
from proxy.sql.cache import AnalysisCache
from proxy.sql.info import Analysis, StatementInfo

_Key = tuple[str, str, tuple[str, ...], str]


class PolicyCache:
    """Bounded LRU of Decisions in front of AnalysisCache + decide()."""

    __slots__ = ("_data", "_env", "_policy", "analyses", "maxsize")

    def __init__(
        self,
        policy: Policy,
        *,
        env: Environment = DEFAULT_ENVIRONMENT,
        analyses: AnalysisCache | None = None,
        maxsize: int = 10_000,
    ) -> None:
        self._policy = policy
        self._env = env
        self.analyses = analyses if analyses is not None else AnalysisCache(maxsize)
        self.maxsize = maxsize
        self._data: OrderedDict[_Key, Decision] = OrderedDict()

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def env(self) -> Environment:
        return self._env

    def swap(self, policy: Policy | None = None, env: Environment | None = None) -> None:
        """Install a new policy and/or environment; every cached decision is dropped."""
        self._data = OrderedDict()
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
        key = (sql, role, search_path, database)
        data = self._data
        found = data.get(key)
        if found is not None:
            data.move_to_end(key)
            return found
        try:
            analysis = self.analyses.analyze(sql)
        except AnalysisError:
            decision = Decision(False, f'role "{role}": statement does not parse; denied')
            data[key] = decision
            if len(data) > self.maxsize:
                data.popitem(last=False)
            return decision
        # Keyed by the analysis cache's key: the template when the same statement with
        # other constants must get the same decision.
        return self.decide_keyed(
            self.analyses.last_key, analysis, role, search_path, database, prepared
        )

    def decide_keyed(
        self,
        key: str,
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
            return found
        decision = decide(
            self._policy, role, analysis, search_path, database, env=self._env,
            prepared=prepared,
        )
        if not analysis.has_execute:
            data[k] = decision
            if len(data) > self.maxsize:
                data.popitem(last=False)
        return decision

    def __len__(self) -> int:
        return len(self._data)
