"""`adscore models ...` (the admin API from a shell) and `adscore keys create`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from service.admin_client import AdminApiError, AdminClient
from service.auth import AuthConfigError, add_key


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.url, args.api_key)


def cmd_models(args: argparse.Namespace) -> int:
    client = _client(args)
    action = args.action
    calls: dict[str, Any] = {
        "list": lambda: client.list(),
        "show": lambda: client.show(args.model),
        "publish": lambda: client.publish(args.model, args.folder, activate=args.activate),
        "activate": lambda: client.activate(args.model, args.version),
        "rollback": lambda: client.rollback(args.model),
        "canary": lambda: (
            client.clear_canary(args.model)
            if args.off
            else client.set_canary(args.model, args.version, args.weight)
        ),
        "shadow": lambda: (
            client.clear_shadow(args.model)
            if args.off
            else client.set_shadow(args.model, args.version)
        ),
        "unload": lambda: client.unload(args.model),
        "route": lambda: client.route_tenant(args.tenant, None if args.remove else args.to),
    }
    if action in ("canary", "shadow") and not args.off and args.version is None:
        print(f"error: give a VERSION, or --off to stop the {action}", file=sys.stderr)
        return 2
    if action == "canary" and not args.off and args.weight is None:
        print("error: give --weight (share of users, 0 < w <= 1)", file=sys.stderr)
        return 2
    if action == "route" and not args.remove and not args.to:
        print("error: give --to MODEL, or --remove", file=sys.stderr)
        return 2
    try:
        result = calls[action]()
    except AdminApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    try:
        key = add_key(args.file, args.name, args.role, args.tenant or None)
    except AuthConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"created key {args.name!r} ({', '.join(args.role)}) in {args.file}; it is shown only now:",
        file=sys.stderr,
    )
    print(key)
    return 0


def register(commands: Any) -> None:
    """Add the `models` and `keys` commands to the `adscore` parser."""
    models = commands.add_parser(
        "models",
        help="list, publish, activate, canary, shadow, roll back and unload model versions",
        description="Operate the models API of a running adscore. The key comes from "
        "--api-key or ADSCORE_API_KEY; it needs the admin role for every change.",
    )
    models.add_argument(
        "--url",
        default=os.environ.get("ADSCORE_URL", "http://127.0.0.1:8000"),
        help="the service (default $ADSCORE_URL or http://127.0.0.1:8000)",
    )
    models.add_argument(
        "--api-key", default=os.environ.get("ADSCORE_API_KEY"), help="default $ADSCORE_API_KEY"
    )
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, model: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=help_text
        )
        if model:
            parser.add_argument("--model", default="pcvr", help="model name (default pcvr)")
        return parser

    action("list", "what the replica serves: versions, canary, shadow, refusals", model=False)
    action("show", "a model's policy and published versions")
    publish = action("publish", "upload FOLDER/model.onnx and FOLDER/metadata.json as a version")
    publish.add_argument("folder", type=Path, help="folder with model.onnx and metadata.json")
    publish.add_argument("--activate", action="store_true", help="activate it once it loads")
    activate = action("activate", "make VERSION the active version (checked before it serves)")
    activate.add_argument("version", type=int)
    action("rollback", "return to the previous active version")
    canary = action("canary", "score a share of users (by user id) with VERSION")
    canary.add_argument("version", type=int, nargs="?")
    canary.add_argument("--weight", type=float, help="share of users, 0 < w <= 1")
    canary.add_argument("--off", action="store_true", help="stop the canary")
    shadow = action("shadow", "also score every request with VERSION, for metrics only")
    shadow.add_argument("version", type=int, nargs="?")
    shadow.add_argument("--off", action="store_true", help="stop shadow scoring")
    action("unload", "unload a tenant model from the replica that takes the call")
    route = action("route", "route a tenant to a model (routing.json)", model=False)
    route.add_argument("tenant")
    route.add_argument("--to", metavar="MODEL", help="the tenant's model")
    route.add_argument("--remove", action="store_true", help="back to the default model")
    models.set_defaults(handler=cmd_models)

    keys = commands.add_parser(
        "keys", help="manage API keys", description="Manage the API key file (hashed keys)."
    )
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = key_actions.add_parser(
        "create",
        help="create a key, store its hash and print the key once",
        description="Create a random API key, add its SHA-256 to the key file (created if "
        "absent) and print the key once on stdout.",
    )
    create.add_argument("--file", type=Path, required=True, help="the API key file")
    create.add_argument("--name", required=True, help="who holds it (shown in audit logs)")
    create.add_argument(
        "--role", action="append", choices=["scorer", "admin"], required=True, help="repeatable"
    )
    create.add_argument(
        "--tenant", action="append", help="limit a scorer key to this tenant (repeatable)"
    )
    create.set_defaults(handler=cmd_keys_create)
