"""The policy's JSON Schema, generated from the models (``python -m edgeway.gateway.schema`` rewrites it).

Shipped as ``gateway/policy.schema.json`` so editors validate while ops type:
put ``# yaml-language-server: $schema=<path or URL>/policy.schema.json`` at the
top of a policy file. A test keeps the shipped file in step with the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .config import Policy

SCHEMA_PATH = Path(__file__).with_name("policy.schema.json")


def policy_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a version-1 policy file."""
    schema = Policy.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edgeway.dev/schema/policy-v1.json"
    schema["title"] = "Edgeway policy (version 1)"
    return schema


def render() -> str:
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
