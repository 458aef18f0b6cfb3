"""The JSON API (documented in webui/openapi.json, served at /api/openapi.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from flask.typing import ResponseReturnValue

from webui.actions import console, perform
from webui.auth import admin_required, csrf_token
from webui.service import InputError

bp = Blueprint("api", __name__)
OPENAPI = Path(__file__).with_name("openapi.json")


_JSON_TYPES = {int: "an integer", bool: "true or false", str: "a string"}
_RANGES = {"weight": " 0-2147483647", "port": " 1-65535"}  # as webui/validate.py checks them


def _body(fields: dict[str, type]) -> dict[str, Any]:
    """The request's JSON object, with only ``fields``, each of its JSON type (the
    forms' strings such as "7" or "on" are not JSON numbers or booleans); anything
    else (not JSON, not an object, nested too deep for the parser, not UTF-8, an
    unknown field, null) is a 400 naming the field."""
    if not request.is_json:
        raise InputError("the request body must be a JSON object "
                         "(Content-Type: application/json)")
    try:
        data = json.loads(request.get_data(as_text=False))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise InputError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"unknown field {unknown[0][:64]!r}", unknown[0][:64])
    for name, value in data.items():
        want = fields[name]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            limits = _RANGES.get(name, "") if want is int else ""
            raise InputError(f"{name}: must be {_JSON_TYPES[want]}{limits}, "
                             f"got {value!r:.64}", name)
    return data


@bp.route("/openapi.json")
def openapi() -> ResponseReturnValue:
    return Response(OPENAPI.read_text(), mimetype="application/json")


@bp.route("/whoami")
def whoami() -> ResponseReturnValue:
    out: dict[str, Any] = {"user": g.user.name, "role": g.user.role}
    if not g.via_token:
        out["csrf_token"] = csrf_token()
    return jsonify(out)


@bp.route("/services")
def services() -> ResponseReturnValue:
    return jsonify(console().overview())


@bp.route("/services/<sid>")
def service(sid: str) -> ResponseReturnValue:
    return jsonify(console().service(sid))


@bp.route("/ext-stats")
def ext_stats() -> ResponseReturnValue:
    return jsonify(console().ext())


@bp.route("/xdp")
def xdp() -> ResponseReturnValue:
    return jsonify(console().xdp_counters())


@bp.route("/attack")
def attack() -> ResponseReturnValue:
    return jsonify(console().attack())


@bp.route("/sysctl")
def sysctl() -> ResponseReturnValue:
    return jsonify({"sysctls": console().sysctls()})


@bp.route("/services/<sid>/real-servers/<rid>/weight", methods=["PUT"])
@admin_required
def set_weight(sid: str, rid: str) -> ResponseReturnValue:
    weight = _body({"weight": int}).get("weight")
    return jsonify(perform("set_weight", f"{sid}/{rid}", {"weight": weight},
                           lambda c: c.set_weight(sid, rid, weight)))


@bp.route("/services/<sid>/real-servers/<rid>/proxy-protocol", methods=["PUT"])
@admin_required
def set_proxy_protocol(sid: str, rid: str) -> ResponseReturnValue:
    value = _body({"proxy_protocol": str}).get("proxy_protocol")
    return jsonify(perform("set_proxy_protocol", f"{sid}/{rid}", {"proxy_protocol": value},
                           lambda c: c.set_proxy_protocol(sid, rid, value)))


@bp.route("/services/<sid>/real-servers/<rid>/drain", methods=["POST"])
@admin_required
def drain(sid: str, rid: str) -> ResponseReturnValue:
    return jsonify(perform("drain", f"{sid}/{rid}", {"weight": 0},
                           lambda c: c.set_weight(sid, rid, 0)))


@bp.route("/services/<sid>/real-servers", methods=["POST"])
@admin_required
def add_dest(sid: str) -> ResponseReturnValue:
    body = _body({"addr": str, "port": int, "weight": int, "forward": str,
                  "proxy_protocol": str})
    params = {k: body.get(k) for k in ("addr", "port", "weight", "forward",
                                       "proxy_protocol")}
    res = perform("add_real_server", sid, params,
                  lambda c: c.add_dest(sid, body.get("addr"), body.get("port"),
                                       body.get("weight", 1), body.get("forward"),
                                       body.get("proxy_protocol")))
    return jsonify(res), 201


@bp.route("/services/<sid>/real-servers/<rid>", methods=["DELETE"])
@admin_required
def delete_dest(sid: str, rid: str) -> ResponseReturnValue:
    return jsonify(perform("remove_real_server", f"{sid}/{rid}", {},
                           lambda c: c.del_dest(sid, rid)))


@bp.route("/services/<sid>/synproxy", methods=["PUT"])
@admin_required
def set_synproxy(sid: str) -> ResponseReturnValue:
    enabled = _body({"enabled": bool}).get("enabled")
    return jsonify(perform("set_synproxy", sid, {"enabled": enabled},
                           lambda c: c.set_synproxy(sid, enabled)))


def openapi_paths() -> list[str]:
    """The paths the OpenAPI file documents (tests compare them with the routes)."""
    return sorted(json.loads(OPENAPI.read_text())["paths"])
