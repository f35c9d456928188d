"""The LLM judge against a fake OpenAI-compatible server; strict parsing of its answers."""

import http.server
import json
import os
import threading

import pytest

from apollo.agents import storage
from apollo.agents.supervision import judging, labels, llm_judge
from tests.agents.helpers import call, run_canned


@pytest.fixture
def store(tmp_path):
  s = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  yield s
  s.close()


class _FakeChatServer:
  """An OpenAI-compatible /chat/completions stub on 127.0.0.1 with canned answers."""

  def __init__(self, answers):
    self.answers = list(answers)
    self.requests = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append((self.path, body))
        answer = outer.answers.pop(0)
        if isinstance(answer, int):
          payload, status = b'{"error": "bad request"}', answer
        else:
          payload, status = (
            json.dumps(
              {
                "choices": [{"message": {"role": "assistant", "content": answer}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5},
              }
            ).encode(),
            200,
          )
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      def log_message(self, *args):
        del args

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(
      target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()
    self.thread.join(timeout=5)


def test_llm_judge_against_a_fake_openai_server(store):
  run_canned(
    store,
    "a",
    1,  # no noisy labels, learning rates above 5e-4 diverge, no GPU conflict
    [
      call("list_files"),
      call("read_file", path="README.md"),
      call("read_file", path="README.md"),
      call("gpu_status"),
      call("list_jobs"),
    ],
    guidance_after={0: "Read the README first."},
  )
  answers = [
    '{"verdict": "keep", "reason": "ok", "explanation": "Looks around first."}',
    '```json\n{"verdict": "keep", "reason": "ok"}\n```',
    '{"verdict": "mask", "reason": "redundant", "explanation": "Same file again."}',
    "The action looks fine to me.",  # not JSON
    400,  # the server refuses
  ]
  with _FakeChatServer(answers) as server:
    judge = llm_judge.LLMJudge.from_openai(server.url, "judge-model", timeout_s=5, max_retries=0)
    result = judging.judge_session(store, "a", [judge], labels.LabelStore(store.path))
  verdicts = {i: (ls[0].verdict, ls[0].reason) for i, ls in result.labels.items()}
  assert verdicts == {
    0: ("keep", "ok"),
    1: ("keep", "ok"),
    2: ("mask", "redundant"),
    3: ("keep", "judge_error"),
    4: ("keep", "judge_error"),
  }
  assert result.labels[2][0].detail == "Same file again."
  assert result.masked_steps() == [2]  # a judge error keeps the action
  assert judge.calls == 5 and dict(judge.errors) == {"malformed": 1, "backend": 1}
  # What the judge saw: the fixed prompt, the task, the advice, the history, the action
  # and the observation that followed it.
  path, body = server.requests[2]
  assert path == "/v1/chat/completions" and body["model"] == "judge-model"
  assert body["temperature"] == 0.0
  system, user = body["messages"]
  assert system == {"role": "system", "content": llm_judge.JUDGE_SYSTEM_PROMPT}
  step2 = store.get_step("a", 2)
  for fragment in (
    "TASK (seed 1",
    "Read the README first.",
    'step 0: {"tool": "list_files", "arguments": {}}',
    "step 1:",
    step2.response,
    step2.observation.splitlines()[0],
    "The action to judge (step 2)",
  ):
    assert fragment in user["content"], fragment
  assert "step 2:" not in user["content"].split("# The action to judge")[0]
  stats = judging.masking_stats([result])
  assert stats["judges"]["llm"]["reasons"] == {"ok": 2, "redundant": 1, "judge_error": 2}


@pytest.mark.parametrize(
  "answer,expected",
  [
    (
      '{"verdict": "mask", "reason": "destroys_progress", "explanation": "killed r1"}',
      ("mask", "destroys_progress", "killed r1"),
    ),
    ('  {"verdict": "keep"}\n', ("keep", "ok", "")),
    ('```\n{"verdict": "keep", "reason": "ok"}\n```', ("keep", "ok", "")),
  ],
)
def test_parse_judge_answer_accepts(answer, expected):
  assert llm_judge.parse_judge_answer(answer) == expected


@pytest.mark.parametrize(
  "answer",
  [
    "",
    "keep",
    '["keep"]',
    '{"verdict": "maybe", "reason": "ok"}',
    '{"verdict": "mask", "reason": "ok"}',
    '{"verdict": "mask", "reason": "bad vibes"}',
    'Sure! {"verdict": "keep", "reason": "ok"}',
    '{"verdict": "keep", "explanation": 3}',
  ],
)
def test_parse_judge_answer_rejects(answer):
  with pytest.raises(llm_judge.JudgeAnswerError):
    llm_judge.parse_judge_answer(answer)
