"""Per-role access policy: who may run which statements on which relations and columns."""

from proxy.policy.cache import PolicyCache
from proxy.policy.engine import (
    DEFAULT_ENVIRONMENT,
    ColumnView,
    Decision,
    Environment,
    decide,
    search_path_after,
)
from proxy.policy.model import Policy, PolicyError, PolicyIssue, RolePolicy

__all__ = [
    "DEFAULT_ENVIRONMENT",
    "ColumnView",
    "Decision",
    "Environment",
    "Policy",
    "PolicyCache",
    "PolicyError",
    "PolicyIssue",
    "RolePolicy",
    "decide",
    "search_path_after",
]
