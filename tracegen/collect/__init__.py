"""The collect stage: the ReAct loop for one trajectory, the driver, tasks, progress, the summary."""
