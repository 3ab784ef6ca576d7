"""A seeded generator of arithmetic and algebra problems with worked solutions.

Every problem comes from one of a few templates (column addition, subtraction by place
value, long multiplication, division with remainder, fractions, percentages, order of
operations, linear equations, expanding and collecting like terms, a word problem), with
numbers drawn from `random.Random(seed)`, so the same seed always gives the same
problems. Solutions show the intermediate steps, since the point of the domain is text
whose later tokens follow from the earlier ones.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class MathProblem:
    """One generated problem: its template name, question, worked steps and final answer."""

    kind: str
    question: str
    solution: str
    answer: str

    def text(self) -> str:
        """The problem as one document."""
        return f"Problem: {self.question}\nSolution:\n{self.solution}\nAnswer: {self.answer}\n"


def generate_problems(num_problems: int, *, seed: int = 0) -> list[MathProblem]:
    """Generate problems, cycling through the templates in a seeded random order.

    Args:
        num_problems: how many problems to make.
        seed: seed of the random number generator; equal seeds give equal problems.

    Returns:
        `num_problems` problems.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems ({num_problems}) must be >= 0")
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES)(rng) for _ in range(num_problems)]


def _signed(value: int | Fraction) -> str:
    """' + 5' or ' - 5': a term written after another term."""
    return f" + {value}" if value >= 0 else f" - {-value}"


def _linear(coefficient: int, constant: int, variable: str = "x") -> str:
    """Format coefficient * variable + constant the way people write it: 'x - 3', '-2x', '7'."""
    if coefficient == 0:
        return str(constant)
    if coefficient == 1:
        head = variable
    elif coefficient == -1:
        head = f"-{variable}"
    else:
        head = f"{coefficient}{variable}"
    return head if constant == 0 else head + _signed(constant)


def _addition(rng: random.Random) -> MathProblem:
    a, b = rng.randint(100, 99999), rng.randint(10, 9999)
    steps, carry = [], 0
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    places = ["ones", "tens", "hundreds", "thousands", "ten-thousands"]
    for i in range(len(digits_a)):
        digit_b = int(digits_b[i]) if i < len(digits_b) else 0
        total = int(digits_a[i]) + digit_b + carry
        carried = f" + {carry} carried" if carry else ""
        carry_out = f", carry {total // 10}" if total >= 10 else ""
        sum_text = f"{digits_a[i]} + {digit_b}{carried} = {total}"
        steps.append(f"{places[i]}: {sum_text}, write {total % 10}{carry_out}")
        carry = total // 10
    if carry:
        steps.append(f"the final carry {carry} becomes the leading digit")
    return MathProblem("addition", f"Compute {a} + {b}.", "\n".join(steps), str(a + b))


def _subtraction(rng: random.Random) -> MathProblem:
    b = rng.randint(10, 9999)
    a = rng.randint(b + 1, b + 50000)
    steps, current = [], a
    place = 10 ** (len(str(b)) - 1)
    # Subtract b one place value at a time: a - 937 = a - 900 - 30 - 7.
    while place >= 1:
        part = (b // place % 10) * place
        if part:
            steps.append(f"{current} - {part} = {current - part}")
            current -= part
        place //= 10
    return MathProblem("subtraction", f"Compute {a} - {b}.", "\n".join(steps), str(a - b))


def _multiplication(rng: random.Random) -> MathProblem:
    a, b = rng.randint(12, 9999), rng.randint(12, 999)
    steps, partials = [], []
    for power, digit in enumerate(reversed(str(b))):
        factor = int(digit) * 10**power
        if factor:
            partials.append(a * factor)
            steps.append(f"{a} × {factor} = {a * factor}")
    steps.append(" + ".join(map(str, partials)) + f" = {a * b}")
    return MathProblem("multiplication", f"Compute {a} × {b}.", "\n".join(steps), str(a * b))


def _division(rng: random.Random) -> MathProblem:
    divisor = rng.randint(3, 99)
    quotient, remainder = rng.randint(10, 999), rng.randint(0, divisor - 1)
    dividend = divisor * quotient + remainder
    steps = [
        f"{divisor} goes into {dividend} {quotient} times: "
        f"{divisor} × {quotient} = {divisor * quotient}",
        f"remainder: {dividend} - {divisor * quotient} = {remainder}",
    ]
    answer = f"{quotient} remainder {remainder}"
    return MathProblem("division", f"Divide {dividend} by {divisor}.", "\n".join(steps), answer)


def _random_fraction(rng: random.Random) -> Fraction:
    denominator = rng.randint(2, 12)
    numerator = rng.choice([n for n in range(1, 2 * denominator) if n % denominator])
    return Fraction(numerator, denominator)


def _fractions(rng: random.Random) -> MathProblem:
    x, y = _random_fraction(rng), _random_fraction(rng)
    op = rng.choice("+-×")
    if op == "×":
        product_num, product_den = x.numerator * y.numerator, x.denominator * y.denominator
        steps = [f"multiply the tops and the bottoms: {product_num}/{product_den}"]
        result = x * y
    else:
        common = math.lcm(x.denominator, y.denominator)
        top_x, top_y = x.numerator * common // x.denominator, y.numerator * common // y.denominator
        top = top_x + top_y if op == "+" else top_x - top_y
        steps = [
            f"common denominator: lcm({x.denominator}, {y.denominator}) = {common}",
            f"{x} = {top_x}/{common} and {y} = {top_y}/{common}",
            f"{top_x} {'+' if op == '+' else '-'} {top_y} = {top}, giving {top}/{common}",
        ]
        result = x + y if op == "+" else x - y
    steps.append(f"in lowest terms: {result}")
    question = f"Compute {x} {op} {y}."
    return MathProblem("fractions", question, "\n".join(steps), str(result))


def _percent(rng: random.Random) -> MathProblem:
    percent = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 120, 150])
    whole = rng.randint(1, 80) * 20
    result = Fraction(percent * whole, 100)
    steps = [
        f"{percent}% means {percent}/100",
        f"{percent}/100 × {whole} = {percent * whole}/100 = {result}",
    ]
    question = f"What is {percent}% of {whole}?"
    return MathProblem("percent", question, "\n".join(steps), str(result))


def _order_of_operations(rng: random.Random) -> MathProblem:
    a, b, c, d = (rng.randint(1, 20) for _ in range(4))
    c = c + d  # keep the bracket positive so every step is easy to read
    inner = c - d
    product = b * inner
    answer = a + product
    steps = [
        f"brackets first: {c} - {d} = {inner}",
        f"then multiply: {b} × {inner} = {product}",
        f"then add: {a} + {product} = {answer}",
    ]
    question = f"Evaluate {a} + {b} × ({c} - {d})."
    return MathProblem("order_of_operations", question, "\n".join(steps), str(answer))


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    return rng.choice([v for v in range(low, high + 1) if v != 0])


def _linear_equation(rng: random.Random) -> MathProblem:
    x = rng.randint(-20, 20)
    a, b = _nonzero(rng, -9, 9), _nonzero(rng, -30, 30)
    c = rng.choice([0, _nonzero(rng, -9, 9)])
    while c == a:
        c = _nonzero(rng, -9, 9)
    d = a * x + b - c * x  # chosen so that x solves a*x + b = c*x + d
    question = f"Solve for x: {_linear(a, b)} = {_linear(c, d)}."
    steps = []
    if c:
        steps.append(f"move the x terms to the left: {_linear(a - c, b)} = {d}")
    steps.append(f"move the constant to the right: {_linear(a - c, 0)} = {d} - ({b}) = {d - b}")
    steps.append(f"divide both sides by {a - c}: x = {d - b}/{a - c} = {x}")
    return MathProblem("linear_equation", question, "\n".join(steps), f"x = {x}")


def _expand_and_collect(rng: random.Random) -> MathProblem:
    p, q = _nonzero(rng, -9, 9), _nonzero(rng, -12, 12)
    r, s = _nonzero(rng, -9, 9), _nonzero(rng, -12, 12)
    first = f"{p}(x{_signed(q)})"
    second = f"{abs(r)}(x{_signed(s)})"
    question = f"Simplify {first} {'+' if r > 0 else '-'} {second}."
    steps = [
        f"expand: {_linear(p, p * q)} and {_linear(r, r * s)}",
        f"collect x terms: {p}x{_signed(r)}x = {p + r}x",
        f"collect constants: {p * q}{_signed(r * s)} = {p * q + r * s}",
    ]
    answer = _linear(p + r, p * q + r * s)
    return MathProblem("expand_and_collect", question, "\n".join(steps), answer)


_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas")
_ITEMS = ("apples", "stickers", "marbles", "pencils", "stamps", "cards", "shells", "coins")


def _word_problem(rng: random.Random) -> MathProblem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start, packs, per_pack = rng.randint(2, 60), rng.randint(2, 9), rng.randint(3, 15)
    given = rng.randint(1, start + packs * per_pack - 1)
    question = (
        f"{name} has {start} {item}, buys {packs} packs of {per_pack} {item} each, "
        f"then gives away {given}. How many {item} does {name} have now?"
    )
    bought = packs * per_pack
    steps = [
        f"bought: {packs} × {per_pack} = {bought}",
        f"after buying: {start} + {bought} = {start + bought}",
        f"after giving away: {start + bought} - {given} = {start + bought - given}",
    ]
    return MathProblem("word_problem", question, "\n".join(steps), str(start + bought - given))


_TEMPLATES = (
    _addition,
    _subtraction,
    _multiplication,
    _division,
    _fractions,
    _percent,
    _order_of_operations,
    _linear_equation,
    _expand_and_collect,
    _word_problem,
)
