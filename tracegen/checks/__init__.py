"""The filter's checks: structural, duplicates, reference answers, tests, the LLM judge, replay."""
