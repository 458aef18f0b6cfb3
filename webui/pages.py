"""HTML pages and their confirmed actions. Routes are thin: they validate through
the service layer, show a confirmation page, then perform the change."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from webui.actions import console, perform
from webui.auth import admin_required
from webui.service import (
    FWD_CHOICES,
    PROXY_CHOICES,
    InputError,
    NotFoundError,
    parse_bool,
    parse_proxy_protocol,
    parse_weight,
)

bp = Blueprint("pages", __name__)


@bp.route("/")
def overview() -> ResponseReturnValue:
    return render_template("overview.html", data=console().overview())


@bp.route("/services/<sid>")
def service(sid: str) -> ResponseReturnValue:
    return render_template("service.html", svc=console().service(sid),
                           fwd_choices=FWD_CHOICES, proxy_choices=PROXY_CHOICES)


@bp.route("/synproxy")
def synproxy() -> ResponseReturnValue:
    return render_template("synproxy.html", data=console().ext(), attack=console().attack(),
                           xdp=console().xdp_counters())


@bp.route("/sysctl")
def sysctl() -> ResponseReturnValue:
    return render_template("sysctl.html", knobs=console().sysctls())


def _confirm(title: str, question: str, fields: dict[str, Any]) -> ResponseReturnValue:
    """The confirmation step: the same form again with ``confirm=yes``."""
    return render_template("confirm.html", title=title, question=question,
                           action=request.path, fields=fields,
                           back=url_for("pages.service", sid=request.view_args["sid"]
                                        if request.view_args else ""))


def _confirmed() -> bool:
    return request.form.get("confirm") == "yes"


def _done(sid: str, message: str) -> ResponseReturnValue:
    flash(message)
    return redirect(url_for("pages.service", sid=sid))


@bp.route("/services/<sid>/rs/<rid>/weight", methods=["POST"])
@admin_required
def set_weight(sid: str, rid: str) -> ResponseReturnValue:
    weight = parse_weight(request.form.get("weight"))
    svc, dest = console().dest(sid, rid)
    if not _confirmed():
        return _confirm("Change weight",
                        f"Set the weight of real server {dest['addr']}:{dest['port']} of "
                        f"{svc['name']} from {dest['weight']} to {weight}?",
                        {"weight": weight})
    perform("set_weight", f"{sid}/{rid}", {"weight": weight},
            lambda c: c.set_weight(sid, rid, weight))
    return _done(sid, f"Weight of {dest['addr']}:{dest['port']} set to {weight}.")


@bp.route("/services/<sid>/rs/<rid>/proxy-protocol", methods=["POST"])
@admin_required
def set_proxy_protocol(sid: str, rid: str) -> ResponseReturnValue:
    pp = str(parse_proxy_protocol(request.form.get("proxy_protocol")))
    svc, dest = console().dest(sid, rid)
    if not _confirmed():
        return _confirm("PROXY protocol",
                        f"Set the PROXY protocol header of real server "
                        f"{dest['addr']}:{dest['port']} of {svc['name']} from "
                        f"{dest['proxy_protocol']} to {pp}? New connections only; the "
                        "server must accept exactly that (e.g. nginx's listen … "
                        "proxy_protocol).", {"proxy_protocol": pp})
    perform("set_proxy_protocol", f"{sid}/{rid}", {"proxy_protocol": pp},
            lambda c: c.set_proxy_protocol(sid, rid, pp))
    return _done(sid, f"PROXY protocol of {dest['addr']}:{dest['port']} set to {pp}.")


@bp.route("/services/<sid>/rs/<rid>/drain", methods=["POST"])
@admin_required
def drain(sid: str, rid: str) -> ResponseReturnValue:
    svc, dest = console().dest(sid, rid)
    if not _confirmed():
        return _confirm("Drain real server",
                        f"Drain real server {dest['addr']}:{dest['port']} of {svc['name']} "
                        f"(weight {dest['weight']} → 0: no new connections, existing "
                        "ones continue)?", {})
    perform("drain", f"{sid}/{rid}", {"weight": 0}, lambda c: c.set_weight(sid, rid, 0))
    return _done(sid, f"{dest['addr']}:{dest['port']} drained (weight 0).")


@bp.route("/services/<sid>/rs/<rid>/delete", methods=["POST"])
@admin_required
def delete_dest(sid: str, rid: str) -> ResponseReturnValue:
    svc, dest = console().dest(sid, rid)
    if not _confirmed():
        return _confirm("Remove real server",
                        f"Remove real server {dest['addr']}:{dest['port']} from "
                        f"{svc['name']}? Its {dest['active_conns']} active connections "
                        "lose their server.", {})
    perform("remove_real_server", f"{sid}/{rid}", {}, lambda c: c.del_dest(sid, rid))
    return _done(sid, f"{dest['addr']}:{dest['port']} removed.")


@bp.route("/services/<sid>/rs", methods=["POST"])
@admin_required
def add_dest(sid: str) -> ResponseReturnValue:
    f = request.form
    params = {"addr": f.get("addr", "").strip(), "port": f.get("port", "").strip(),
              "weight": f.get("weight", "1").strip(), "forward": f.get("forward", ""),
              "proxy_protocol": f.get("proxy_protocol", "")}
    args = (params["addr"], params["port"] or None, params["weight"],
            params["forward"] or None, params["proxy_protocol"] or None)
    svc, dest = console().check_new_dest(sid, *args)
    if not _confirmed():
        return _confirm("Add real server",
                        f"Add real server {dest['addr']}:{dest['port']} ({dest['forward']}, "
                        f"weight {dest['weight']}, PROXY protocol {dest['proxy_protocol']}) "
                        f"to {svc['name']}?", params)
    res = perform("add_real_server", sid, params, lambda c: c.add_dest(sid, *args))
    return _done(sid, f"Real server {res['real_server']} added.")


def _service_name(sid: str) -> str:
    """The service's display name; an unknown service in an action is a 400."""
    try:
        return str(console().service(sid)["name"])
    except NotFoundError:
        raise InputError(f"no service {sid!r}", "service") from None


@bp.route("/services/<sid>/synproxy", methods=["POST"])
@admin_required
def set_synproxy(sid: str) -> ResponseReturnValue:
    on = parse_bool(request.form.get("enabled"), "enabled")
    name = _service_name(sid)
    if not _confirmed():
        return _confirm("SYN proxy", f"Turn the SYN proxy {'on' if on else 'off'} for "
                                     f"{name}?", {"enabled": "on" if on else "off"})
    perform("set_synproxy", sid, {"enabled": on}, lambda c: c.set_synproxy(sid, on))
    return _done(sid, f"SYN proxy {'on' if on else 'off'} for {name}.")
