"""The small-model task suite: pass rate, steps, tokens and time per task, with the harness's
help (loop detection, shaping, answer checks) and without it (a naive baseline: the same loop,
model and prompt, with `loops`, `shaping` and `answers` off), measured in the same run on the same model server.

    python bench/bench_small_models.py                       # the bundled 0.5B local model
    python bench/bench_small_models.py --only add-two,csv-row --repeat 2
    python bench/bench_small_models.py --provider openai --model NAME --base-url URL

Tasks: bench/tasks/small.toml (see its header for the graders). Each task runs in a fresh
working directory holding its files, with its own tools, on a fresh SQLite log.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from loopstream import SessionConfig, SQLiteLog, build_runtime
from loopstream.core.state import SessionState
from loopstream.runtime.assembly import DEFAULT_SYSTEM_PROMPT, open_model
from loopstream.tools.builtin import default_registry

TASKS = Path(__file__).with_name("tasks") / "small.toml"
CONFIGS = {
    "harness": {},
    "naive": {"loops": {"enabled": False}, "shaping": {"enabled": False}, "answers": {"enabled": False}},
}


@dataclass
class Task:
    id: str
    goal: str
    tools: list[str]
    files: dict[str, str] = field(default_factory=dict)
    allow_writes: bool = False
    answer_contains: list[str] = field(default_factory=list)
    answer_regex: str | None = None
    file: str | None = None
    file_contains: list[str] = field(default_factory=list)

    def passed(self, state: SessionState, workdir: Path) -> bool:
        answer = (state.answer or "").lower() if state.status == "done" else ""
        if self.file is not None:
            target = workdir / self.file
            text = target.read_text(errors="replace") if target.is_file() else ""
            return all(t in text for t in self.file_contains)
        if not answer:
            return False
        if self.answer_regex and not re.search(self.answer_regex, answer, re.I):
            return False
        return all(t.lower() in answer for t in self.answer_contains)


def load_tasks(path: Path) -> list[Task]:
    data = tomllib.loads(path.read_text())
    tasks = [Task(**t) for t in data["task"]]
    if len({t.id for t in tasks}) != len(tasks):
        sys.exit(f"{path}: task ids repeat")
    return tasks


@dataclass
class Outcome:
    passed: bool
    status: str
    steps: int
    tokens: int
    seconds: float
    why: str


def run_task(task: Task, provider, config_name: str, max_steps: int) -> Outcome:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        for name, text in task.files.items():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_text(text)
        registry = default_registry(allow_writes=task.allow_writes)
        with SQLiteLog(Path(tmp) / "bench.db") as log:
            rt = build_runtime(log, provider, registry)
            config = SessionConfig(provider=provider.name, model=provider.model, tools=task.tools,
                                   system_prompt=DEFAULT_SYSTEM_PROMPT, max_steps=max_steps,
                                   workdir=str(workdir), policy=CONFIGS[config_name])
            started = time.monotonic()
            sid = rt.start_session(task.goal, config)
            state = rt.run_session(sid)
            seconds = time.monotonic() - started
        return Outcome(task.passed(state, workdir), state.status, state.step, state.input_tokens + state.output_tokens,
                       seconds, (state.error or state.answer or "")[:60].replace("\n", " "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=Path, default=TASKS)
    ap.add_argument("--only", help="comma-separated task ids")
    ap.add_argument("--configs", default="harness,naive", help="harness, naive or both (comma-separated)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per task and configuration")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--provider", default="local")
    ap.add_argument("--model")
    ap.add_argument("--base-url")
    args = ap.parse_args()
    tasks = load_tasks(args.tasks)
    if args.only:
        wanted = set(args.only.split(","))
        tasks = [t for t in tasks if t.id in wanted]
    configs = [c for c in args.configs.split(",") if c]
    if bad := [c for c in configs if c not in CONFIGS]:
        sys.exit(f"--configs: unknown {bad}; known: {', '.join(CONFIGS)}")
    totals: dict[str, list[Outcome]] = {c: [] for c in configs}
    with open_model(args.provider, args.model, args.base_url) as provider:
        print(f"model: {provider.name} {provider.model}; {len(tasks)} tasks × {args.repeat} run(s) × {configs}",
              flush=True)
        print(f"{'task':24} {'config':8} {'pass':>4} {'status':9} {'steps':>5} {'tokens':>7} {'s':>6}  final")
        for task in tasks:
            for config in configs:
                for _ in range(args.repeat):
                    out = run_task(task, provider, config, args.max_steps)
                    totals[config].append(out)
                    print(f"{task.id:24} {config:8} {'yes' if out.passed else 'no':>4} {out.status:9} {out.steps:5d} "
                          f"{out.tokens:7d} {out.seconds:6.1f}  {out.why}", flush=True)
    print()
    print("| config | passed | pass rate | mean steps | mean tokens | mean s/task |")
    print("|---|---|---|---|---|---|")
    for config, outs in totals.items():
        n = len(outs) or 1
        print(f"| {config} | {sum(o.passed for o in outs)}/{len(outs)} | {100 * sum(o.passed for o in outs) / n:.0f}% "
              f"| {sum(o.steps for o in outs) / n:.1f} | {sum(o.tokens for o in outs) / n:.0f} "
              f"| {sum(o.seconds for o in outs) / n:.1f} |")


if __name__ == "__main__":
    main()
