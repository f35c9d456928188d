"""The environment interface: JSON-schema checking of tool calls."""

from apollo.agents import env as env_lib


def test_validate_json_subset():
  schema = {
    "type": "object",
    "properties": {
      "n": {"type": "integer", "minimum": 0, "maximum": 3},
      "name": {"type": "string", "maxLength": 4},
      "mode": {"type": "string", "enum": ["a", "b"]},
      "xs": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["n"],
    "additionalProperties": False,
  }
  assert env_lib.validate_json(schema, {"n": 1, "name": "ab", "mode": "a", "xs": [1, 2.5]}) == []
  errors = env_lib.validate_json(schema, {"name": "abcdef", "mode": "c", "xs": ["x"], "z": 1})
  text = " ".join(errors)
  for fragment in (
    "missing required field 'n'",
    "at most 4",
    "one of ['a', 'b']",
    "xs[0] must be of type number",
    "unknown field(s) ['z']",
  ):
    assert fragment in text
  # bool is not an integer in JSON; ranges are enforced.
  assert env_lib.validate_json(schema, {"n": True})
  assert env_lib.validate_json(schema, {"n": 7})
