"""Sync rules as sandboxed Python: compile once, run with limits, errors named by script line."""

from connections.scripting.sandbox import (
    CompiledScript,
    DebugLog,
    ScriptError,
    StopSync,
    check_script,
    compile_script,
    run_script,
)
from connections.scripting.values import ScriptObject, output_size, to_plain

__all__ = [
    "CompiledScript",
    "DebugLog",
    "ScriptError",
    "ScriptObject",
    "StopSync",
    "check_script",
    "compile_script",
    "output_size",
    "run_script",
    "to_plain",
]
