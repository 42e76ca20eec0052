"""Pure arithmetic tools. `calculate` evaluates an expression by walking its AST
(numbers and + - * / // % ** only), never with eval()."""
from __future__ import annotations

import ast
import operator

from loopstream.tools.registry import ToolError, tool


@tool
def add(a: float, b: float) -> str:
    """Add two numbers and return the sum."""
    return _num(a + b)


@tool
def subtract(a: float, b: float) -> str:
    """Subtract b from a."""
    return _num(a - b)


@tool
def multiply(a: float, b: float) -> str:
    """Multiply two numbers."""
    return _num(a * b)


@tool
def divide(a: float, b: float) -> str:
    """Divide a by b."""
    if b == 0:
        raise ToolError("division by zero", "invalid_arguments")
    return _num(a / b)


_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


@tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as "(3 + 4) * 2 / 7"."""
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a NUL byte; UnicodeEncodeError: a lone surrogate
        raise ToolError(f"not an arithmetic expression: {expression[:200]!r}", "invalid_arguments") from None
    return _num(_eval(tree.body))


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 1000:
            raise ToolError("exponent too large", "invalid_arguments")
        try:
            return _OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero", "invalid_arguments") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ToolError(f"unsupported expression element: {ast.dump(node)[:60]}", "invalid_arguments")


def _num(x: float) -> str:
    """Integers print without a trailing .0 so the model reads 42212, not 42212.0."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**63:
        return str(int(x))
    return str(x)


TOOLS = [add, subtract, multiply, divide, calculate]
