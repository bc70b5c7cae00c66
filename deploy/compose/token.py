#!/usr/bin/env python3
"""Mint an HS256 bearer token for the compose demo.

    python3 deploy/compose/token.py alice
    python3 deploy/compose/token.py bob --ttl 600
    python3 deploy/compose/token.py carol --role chat-admin

Prints a JWT signed with the demo's shared secret (the value of
CHATGATE_AUTH__HMAC_SECRET in compose.yaml; set that variable to sign with
another secret). The token carries what chatgate reads: `sub`,
`preferred_username`, `iat`, `exp` and, with --role, `roles`.

The secret is a published demo value: tokens signed with it prove nothing
outside this demo. Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import sys
import time

# Must equal CHATGATE_AUTH__HMAC_SECRET in compose.yaml.
# DEMO VALUE, NOT FOR PRODUCTION.
DEMO_SECRET = "demo-only-not-for-production-chatgate-compose-hs256"

# chatgate's username rule: 1 to 32 letters or digits of any script, `_`, `-`, `.`.
USERNAME = re.compile(r"[^\W_]|[_.-]")

# chatgate refuses tokens living longer than auth.max_token_lifetime_secs (one day).
MAX_TTL_SECS = 86400


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode(part: dict) -> str:
    return b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))


def mint(secret: str, username: str, ttl: int, roles: list[str]) -> str:
    now = int(time.time())
    claims = {"sub": username, "preferred_username": username, "iat": now, "exp": now + ttl}
    if roles:
        claims["roles"] = roles
    signing_input = encode({"alg": "HS256", "typ": "JWT"}) + "." + encode(claims)
    signature = hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256)
    return signing_input + "." + b64url(signature.digest())


def main() -> int:
    parser = argparse.ArgumentParser(description="Mint an HS256 token for the chatgate compose demo.")
    parser.add_argument("username", help="the token's user (1-32 letters, digits, _ - .)")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600, at most 86400)")
    parser.add_argument(
        "--role", action="append", default=[], help="add a role, e.g. chat-admin (may be repeated)"
    )
    args = parser.parse_args()

    if not 1 <= len(args.username) <= 32 or not all(USERNAME.fullmatch(c) for c in args.username):
        parser.error(f"{args.username!r} is not a valid chatgate username (1-32 letters, digits, _ - .)")
    if not 1 <= args.ttl <= MAX_TTL_SECS:
        parser.error(f"--ttl must be between 1 and {MAX_TTL_SECS} seconds")

    secret = os.environ.get("CHATGATE_AUTH__HMAC_SECRET") or DEMO_SECRET
    if len(secret.encode("utf-8")) < 32:
        parser.error("the secret must be at least 32 bytes, as chatgate requires")

    print(mint(secret, args.username, args.ttl, args.role))
    return 0


if __name__ == "__main__":
    sys.exit(main())
