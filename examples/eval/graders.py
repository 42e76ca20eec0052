"""A Python grader for arithmetic.toml: `function = "graders.py:says_1024"`.

A grader gets the session's final answer and its folded state, and returns a bool, a score
in 0..1 (passes at 0.5 or more), or (passed, detail)."""
import re


def says_1024(answer: str, state) -> tuple[bool, str]:
    numbers = re.findall(r"-?\d[\d,]*", answer)
    ok = any(n.replace(",", "") == "1024" for n in numbers)
    return ok, f"numbers in the answer: {numbers[:5]}"
