"""SQL analysis: parse once with pglast, describe what each statement touches."""

from proxy.sql.analyzer import AnalysisError, SqlError, analyze, fingerprint
from proxy.sql.info import ALL, Analysis, ConfigCall, SetInfo, StatementInfo
from proxy.sql.names import FunctionName, RelationName, parse_search_path

__all__ = [
    "ALL",
    "Analysis",
    "AnalysisError",
    "ConfigCall",
    "FunctionName",
    "RelationName",
    "SetInfo",
    "SqlError",
    "StatementInfo",
    "analyze",
    "fingerprint",
    "parse_search_path",
]
