"""Command-line client of the rollout service.

    python -m apollo.agents.service.cli [--url http://127.0.0.1:8765] [--token T] COMMAND ...

    list                              sessions with status and step counts
    create [--seed N] [--env research] [--backend scripted] [--tool_mode native|text] [--paused]
    show ID                           one session (status, guidance, counts)
    steps ID [--since N] [--limit N]  one line per step
    watch ID                          follow the live event stream
    guide ID TEXT...                  send guidance (returns at once)
    pause ID | resume ID | interrupt ID | stop ID
    flag ID STEP good|bad|clear [--reason TEXT]
    export ID|all [--out FILE]        JSON lines, one per episode (OpenAI chat messages)

The token may also come from the APOLLO_TOKEN environment variable. Exit status is
0 on success and 1 on an API error, whose message is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
from collections.abc import Mapping
from typing import Any

from apollo.agents.service import client as client_lib
from apollo.agents.service import manager as manager_lib


def _step_line(step: Mapping[str, Any]) -> str:
  action = step.get("action")
  what = (
    f"{action['tool']} {json.dumps(action['arguments'])}"
    if action
    else ("SUMMARY" if step["kind"] == "summary" else f"PARSE ERROR: {step['parse_error']}")
  )
  first = (step.get("observation") or "").strip().splitlines()
  flag = f" [{step['human_flag']}]" if step.get("human_flag") else ""
  guided = f" (+guidance {step['guidance_ids']})" if step.get("guidance_ids") else ""
  return f"{step['step_index']:4d}{flag}{guided} {what} -> {(first[0] if first else '')[:100]}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m apollo.agents.service.cli", description="Client of the Apollo rollout service."
  )
  parser.add_argument("--url", default=os.environ.get("APOLLO_URL", client_lib.DEFAULT_URL))
  parser.add_argument("--token", default=os.environ.get("APOLLO_TOKEN"))
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("list")
  create = sub.add_parser("create")
  create.add_argument("--seed", type=int, default=0)
  create.add_argument("--env", default="research")
  create.add_argument("--backend", default="scripted")
  create.add_argument(
    "--tool_mode", choices=["native", "text"], default=None, help="default: the backend's"
  )
  create.add_argument("--paused", action="store_true")
  for name in ("show", "watch", "pause", "resume", "interrupt", "stop"):
    sub.add_parser(name).add_argument("session_id")
  steps = sub.add_parser("steps")
  steps.add_argument("session_id")
  steps.add_argument("--since", type=int, default=-1)
  steps.add_argument("--limit", type=int, default=1000)
  guide = sub.add_parser("guide")
  guide.add_argument("session_id")
  guide.add_argument("text", nargs="+")
  flag = sub.add_parser("flag")
  flag.add_argument("session_id")
  flag.add_argument("step", type=int)
  flag.add_argument("flag", choices=["good", "bad", "clear"])
  flag.add_argument("--reason")
  export = sub.add_parser("export")
  export.add_argument("session_id")
  export.add_argument("--out")
  args = parser.parse_args(argv)
  client = client_lib.HttpClient(args.url, args.token)
  try:
    if args.command == "list":
      for s in client.list_sessions():
        print(
          f"{s['session_id']}  {s['status']:9s} env={s['env_name']} seed={s['seed']} "
          f"steps={s['num_steps']} result={json.dumps(s['result'])}"
        )
    elif args.command == "create":
      agent = {"tool_mode": args.tool_mode} if args.tool_mode else {}
      s = client.create_session(
        env=args.env, seed=args.seed, backend=args.backend, paused=args.paused, agent=agent
      )
      print(s["session_id"])
    elif args.command == "show":
      print(json.dumps(client.get_session(args.session_id), indent=2))
    elif args.command == "steps":
      for step in client.get_steps(args.session_id, args.since, args.limit):
        print(_step_line(step))
    elif args.command == "watch":
      for kind, data in client.events(args.session_id):
        if kind == "step":
          print(_step_line(data), flush=True)
        elif kind == "session":
          print(
            f"# status={data['status']} steps={data['num_steps']} paused={data['paused']}",
            flush=True,
          )
        elif kind == "guidance":
          delivered = data["delivered_step"]
          when = "pending" if delivered is None else f"delivered at step {delivered}"
          print(f"# guidance {data['guidance_id']} ({when}): {data['text'][:100]}", flush=True)
        elif kind == "end":
          print(f"# ended: {data['status']}")
    elif args.command == "guide":
      reply = client.send_guidance(args.session_id, " ".join(args.text))
      print(
        f"guidance {reply['guidance']['guidance_id']} buffered; it reaches the agent at "
        "its next turn"
      )
    elif args.command in ("pause", "resume", "interrupt", "stop"):
      print(json.dumps(client.control(args.session_id, args.command)))
    elif args.command == "flag":
      client.flag_step(
        args.session_id, args.step, None if args.flag == "clear" else args.flag, args.reason
      )
      print("ok")
    elif args.command == "export":
      text = client.export(None if args.session_id == "all" else args.session_id)
      if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
          f.write(text)
        print(f"{text.count(chr(10))} steps written to {args.out}")
      else:
        sys.stdout.write(text)
  except manager_lib.ApiError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except urllib.error.URLError as e:
    print(f"error: cannot reach {args.url}: {e.reason}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
