"""A PreToolUse hook: deny arithmetic on numbers above a million; let everything else through."""
import json
import sys

call = json.load(sys.stdin)
numbers = [v for v in call["tool_input"].values() if isinstance(v, (int, float))]
if any(abs(n) > 1_000_000 for n in numbers):
    print(json.dumps({"decision": "deny", "reason": "numbers above a million need a person"}))
else:
    print(json.dumps({"decision": "allow"}))
