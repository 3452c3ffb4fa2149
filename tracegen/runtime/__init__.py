"""Tool runtimes: where a teacher's tool call gets its observation.

One protocol, two implementations: ``docker`` executes the call in a real sandbox container,
``simulated`` asks a second model to role-play the tool. The agent loop sees only the protocol.
"""

from tracegen.runtime.base import Episode, Runtime, ToolOutput

__all__ = ["Episode", "Runtime", "ToolOutput"]
