"""Talking to teacher APIs: the HTTP pool, the chat client, wire shapes, text tool-call protocols."""
