"""The processors: plain handlers (event in, events out) that run the loop.

- orchestrator: decides the next step from the folded state (ask the model, run tools, finish)
- model: turns a ModelRequested into a provider call and a ModelResponded / ModelFailed
- tools: turns a ToolRequested into a tool call and a ToolCompleted / ToolFailed
"""
