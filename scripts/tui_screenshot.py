"""Regenerate docs/tui-dashboard.svg: the dashboard of a demo swarm (a bootstrap peer and hivemind peers of
the embedded policy on this machine) after a few real rounds, saved with Textual's save_screenshot.

    python scripts/tui_screenshot.py                       # 3 agents, 10 rounds, 140x42
    python scripts/tui_screenshot.py --size 80x24 --out /tmp/small.svg
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "tui-dashboard.svg")
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="rounds to play before the screenshot")
    ap.add_argument("--size", default="140x42", help="terminal WIDTHxHEIGHT")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.lower().split("x"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from p2pswarm.settings import load_settings
    from tui import SwarmApp
    from tui.dashboard import DashboardScreen
    from tui.widgets import RewardPlot

    args.out = args.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # runs/ in a scratch folder; the screen shows the short relative paths a user sees

        def factory(**overrides):
            return load_settings(**{"runs_dir": "runs", "experiment": "demo", "agents": args.agents, "eval_every": 0,
                                    **overrides})

        app = SwarmApp(factory, autostart=True)

        async def shoot() -> Path:
            async with app.run_test(size=(width, height)) as pilot:
                deadline = time.monotonic() + args.timeout

                async def until(cond, what):
                    while not cond():
                        if time.monotonic() > deadline:
                            raise SystemExit(f"timed out waiting for {what}")
                        await pilot.pause(0.2)

                await until(lambda: isinstance(app.screen, DashboardScreen) and app.screen.is_mounted, "the dashboard")
                dash = app.screen
                await until(lambda: dash.query_one(RewardPlot).points >= args.rounds, f"{args.rounds} rounds")
                await until(lambda: dash.phase == "generate", "the next round's generation")
                await pilot.pause(0.5)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                path = Path(app.save_screenshot(filename=args.out.name, path=str(args.out.parent)))
                await pilot.press("q")
                await until(lambda: app.return_value is not None, "the node to stop")
                return path

        path = asyncio.run(shoot())
        os.chdir(ROOT)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
