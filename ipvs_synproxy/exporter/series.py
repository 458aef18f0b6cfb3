"""Every series the exporter serves: name, type, help, labels; and the flood threshold.

This table is the contract that the collector, ``monitoring/`` (alert rules,
Grafana dashboard), the console's attack view and the docs
(``docs/metrics.md``) share; tests hold each of them to it.

Names follow Prometheus' conventions: one ``ipvs_synproxy_`` prefix, base
units, counters end in ``_total``. No ``node_ipvs_*`` series: node_exporter's
IPVS collector already serves those for our modules, and serving them twice
makes every dashboard that sums them count double.

Service series carry ``vip``, ``port`` and ``protocol`` (``tcp``/``udp``/
``sctp``); IPv6 addresses are compressed, without brackets. A firewall-mark
service is ``vip="fwmark:<mark>"``, ``port="0"``, ``protocol="fwmark"``.
The XDP fast path's series carry ``device``, the interface's name.
"""

from __future__ import annotations

from dataclasses import dataclass

# A VIP is "under flood" when, over the last FLOOD_WINDOW_S seconds, SYNs
# reached it at FLOOD_SYN_RATE per second or more while fewer than
# FLOOD_VALID_ACK_RATIO of its cookies came back as valid ACKs: real clients
# answer nearly every cookie, a spoofed flood answers none. The console's
# badge clears FLOOD_CLEAR_S seconds after the last flooded window; the alert
# rules (monitoring/) use the same two numbers.
FLOOD_SYN_RATE = 1000.0
FLOOD_VALID_ACK_RATIO = 0.5
FLOOD_WINDOW_S = 3.0
FLOOD_CLEAR_S = 10.0

SERVICE = ("vip", "port", "protocol")
REAL_SERVER = (*SERVICE, "real_server", "real_port")
LADDR = (*SERVICE, "laddr")


@dataclass(frozen=True)
class Series:
    name: str  # as exposed: counters with their _total
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...] = ()


def _c(name: str, help: str, labels: tuple[str, ...] = ()) -> Series:
    return Series(f"ipvs_synproxy_{name}_total", "counter", help, labels)


def _g(name: str, help: str, labels: tuple[str, ...] = ()) -> Series:
    return Series(f"ipvs_synproxy_{name}", "gauge", help, labels)


ALL: tuple[Series, ...] = (
    # -- the exporter itself
    _g("up", "1 if the last read of the kernel's IPVS table succeeded, else 0."),
    _g("build_info", "Always 1; the ipvs-synproxy version and whether the kernel has "
       "the extended counters (extensions=\"yes\"/\"no\").", ("version", "extensions")),
    # -- services (every service, SYN proxy or not)
    _g("service_info", "Always 1, one per virtual service; syn_proxy=\"on\"/\"off\".",
       (*SERVICE, "scheduler", "syn_proxy")),
    _c("service_connections", "Connections scheduled by the service.", SERVICE),
    _c("service_packets", "Packets through the service; direction=\"in\" (client to "
       "server) or \"out\".", (*SERVICE, "direction")),
    _c("service_bytes", "Bytes through the service, by direction.", (*SERVICE, "direction")),
    # -- the SYN proxy, per service (kernel 0028/0029)
    _c("syns_received", "SYNs that reached a SYN-proxy service.", SERVICE),
    _c("cookies_sent", "SYN/ACKs with a cookie sent for the service.", SERVICE),
    _c("cookie_acks", "Client ACKs checked against a cookie; result=\"valid\", \"invalid\" "
       "or \"timestamp_invalid\" (the timestamp's cookie bits were wrong).",
       (*SERVICE, "result")),
    _c("connections_proxied", "Connections whose real server completed the handshake.",
       SERVICE),
    _c("syns_to_live_connections", "SYNs passed to a live connection of their tuple instead "
       "of answered with a cookie.", SERVICE),
    _c("server_syn_retransmits", "SYNs resent to a real server that had not answered.",
       SERVICE),
    _c("server_handshake_failures", "Real-server handshakes that failed; reason=\"reset\" "
       "(refused), \"timeout\" (never answered: the client got a RST) or "
       "\"unexpected_packet\".", (*SERVICE, "reason")),
    _c("drops", "Packets of a SYN-proxy service dropped, by reason (docs/metrics.md lists "
       "them).", (*SERVICE, "reason")),
    # -- real servers
    _g("real_server_weight", "The real server's weight (0: drained or down).", REAL_SERVER),
    _g("real_server_active_connections", "Established connections to the real server.",
       REAL_SERVER),
    _g("real_server_inactive_connections", "Other connections to the real server.",
       REAL_SERVER),
    _c("real_server_connections", "Connections scheduled to the real server.", REAL_SERVER),
    _c("real_server_packets", "Packets to and from the real server, by direction.",
       (*REAL_SERVER, "direction")),
    _c("real_server_bytes", "Bytes to and from the real server, by direction.",
       (*REAL_SERVER, "direction")),
    # -- FULLNAT local addresses
    _g("fullnat_lports_used", "Connections using the local address (each holds one "
       "local port).", LADDR),
    _g("fullnat_lports_free", "Local ports of the sysctl range not in use by the address "
       "(fullnat_lport_max - fullnat_lport_min + 1 - used, at least 0).", LADDR),
    _c("fullnat_lport_conflicts", "Local-port allocations that found the port taken.",
       LADDR),
    # -- netns-wide counters that have no per-service twin
    _c("fullnat_connections", "FULLNAT connections bound to a local address and port."),
    _c("fullnat_drops", "FULLNAT packets dropped or connections refused, by reason "
       "(no_laddr, lport_exhausted, no_route, bad_header, unsupported).", ("reason",)),
    _c("fullnat_lport_give_ups", "Local addresses skipped because no free port was found "
       "within fullnat_lport_tries."),
    _c("fullnat_mss_adjustments", "Real-server SYN/ACKs whose MSS was lowered to make room "
       "for the TOA option."),
    _c("fullnat_icmp_translated", "ICMP errors translated for FULLNAT connections."),
    _c("toa_options", "TOA options: result=\"added\", \"no_space\", \"too_big\", "
       "\"no_memory\" or \"scrubbed\" (a client-sent TOA option replaced).", ("result",)),
    _c("proxy_headers", "PROXY protocol headers to FULLNAT real servers: result=\"sent\" "
       "(first time), \"resent\" (the real server had not acknowledged it), "
       "\"oversize\" (header and segment over the route MTU: sent fragmented); segments "
       "that were due one and were dropped: \"no_memory\", \"bad_checksum\", \"no_state\" "
       "(the connection's first bytes were never seen, e.g. taken over by sync).",
       ("result",)),
    _c("held_packets", "Client packets held while a real server handshake was under way."),
    _c("sack_blocks_translated", "SACK blocks moved into the other side's sequence numbers."),
    _c("icmp_seq_translated", "ICMP errors whose quoted sequence number was translated."),
    _c("session_reuses", "Connections reopened by a SYN on a closing tuple, by the state "
       "it was in.", ("from_state",)),
    _c("sync_options", "Connection-sync options of ours: result=\"sent\", \"received\" or "
       "\"rejected\".", ("result",)),
    _c("sync_fullnat_stolen", "Stale FULLNAT connections removed to make way for a synced "
       "one."),
    # -- cookies and sync
    _g("cookie_key_period_seconds", "synproxy_secret_period: how long one cookie key is "
       "used (a cookie is accepted for one to two periods)."),
    _g("cookie_key_epoch", "The cookie key's epoch now (unix time // period); never the "
       "secret."),
    _g("sync_daemon_running", "1 if the connection-sync daemon of that state runs, else 0.",
       ("state",)),
    # -- the XDP fast path, per interface (docs/xdp.md)
    _g("xdp_attached", "1 per interface whose XDP program of ours is attached, in "
       "mode=\"native\", \"generic\" or \"offload\"; 0 with mode=\"none\" when it is "
       "pinned but not attached.", ("device", "mode")),
    _c("xdp_packets", "Packets the XDP program on the interface saw, by what it did: "
       "result=\"syn_answered\" (a cookie SYN/ACK sent back), \"syn_malformed\" (a malformed "
       "SYN to a VIP, dropped), \"passed\" (up the stack), \"not_ready\" (no cookie key "
       "yet: up the stack), \"no_room\" (the frame could not grow for the answer: "
       "up the stack, the module answers) or \"syn_known\" (a SYN on a tuple with "
       "earlier segments: up the stack, the module decides).", ("device", "result")),
)
BY_NAME: dict[str, Series] = {s.name: s for s in ALL}

# Extended counters kept per service by the kernel (0028), by their names in
# /proc/net/ip_vs_ext_stats: the series and the extra labels they become.
# They are served per service only (sum them for the netns).
SERVICE_EXT: dict[str, tuple[str, dict[str, str]]] = {
    "synproxy_syn_received": ("ipvs_synproxy_syns_received_total", {}),
    "synproxy_cookie_sent": ("ipvs_synproxy_cookies_sent_total", {}),
    "synproxy_ack_valid": ("ipvs_synproxy_cookie_acks_total", {"result": "valid"}),
    "synproxy_ack_invalid": ("ipvs_synproxy_cookie_acks_total", {"result": "invalid"}),
    "synproxy_ack_ts_invalid": ("ipvs_synproxy_cookie_acks_total",
                                {"result": "timestamp_invalid"}),
    "synproxy_conn_proxied": ("ipvs_synproxy_connections_proxied_total", {}),
    "synproxy_syn_conn": ("ipvs_synproxy_syns_to_live_connections_total", {}),
    "synproxy_syn_retransmit": ("ipvs_synproxy_server_syn_retransmits_total", {}),
    "synproxy_rs_reset": ("ipvs_synproxy_server_handshake_failures_total", {"reason": "reset"}),
    "synproxy_rs_timeout": ("ipvs_synproxy_server_handshake_failures_total",
                            {"reason": "timeout"}),
    "synproxy_rs_handshake_bad": ("ipvs_synproxy_server_handshake_failures_total",
                                  {"reason": "unexpected_packet"}),
    **{ext: ("ipvs_synproxy_drops_total", {"reason": reason}) for ext, reason in (
        ("synproxy_drop_header", "header"),
        ("synproxy_drop_options", "options"),
        ("synproxy_drop_csum", "checksum"),
        ("synproxy_stray_drop", "stray"),
        ("synproxy_udp_drop", "udp"),
        ("synproxy_frag_drop", "fragment"),
        ("synproxy_no_route", "no_route"),
        ("synproxy_nomem", "no_memory"),
        ("synproxy_no_dest", "no_real_server"),
        ("synproxy_defer_drop", "deferred"),
        ("synproxy_opening_drop", "opening"),
        ("synproxy_hold_drop", "hold_full"),
        ("synproxy_hold_mem_drop", "hold_memory"),
        ("synproxy_ack_storm", "ack_storm"),
        ("synproxy_bad_header", "truncated"),
    )},
}

# Extended counters with no per-service twin: netns-wide series.
NETNS_EXT: dict[str, tuple[str, dict[str, str]]] = {
    "fullnat_conn_new": ("ipvs_synproxy_fullnat_connections_total", {}),
    **{f"fullnat_{r}": ("ipvs_synproxy_fullnat_drops_total", {"reason": r}) for r in (
        "no_laddr", "lport_exhausted", "no_route", "bad_header", "unsupported")},
    "fullnat_lport_give_up": ("ipvs_synproxy_fullnat_lport_give_ups_total", {}),
    "fullnat_mss_adjusted": ("ipvs_synproxy_fullnat_mss_adjustments_total", {}),
    "fullnat_icmp": ("ipvs_synproxy_fullnat_icmp_translated_total", {}),
    **{f"fullnat_toa_{r}": ("ipvs_synproxy_toa_options_total",
                            {"result": "no_memory" if r == "nomem" else r}) for r in (
        "added", "no_space", "too_big", "nomem", "scrubbed")},
    **{f"fullnat_proxy_{r}": ("ipvs_synproxy_proxy_headers_total", {"result": label})
       for r, label in (("sent", "sent"), ("resent", "resent"), ("nomem", "no_memory"),
                        ("bad_csum", "bad_checksum"), ("no_state", "no_state"),
                        ("oversize", "oversize"))},
    "synproxy_held": ("ipvs_synproxy_held_packets_total", {}),
    "synproxy_sack_translated": ("ipvs_synproxy_sack_blocks_translated_total", {}),
    "synproxy_icmp_seq": ("ipvs_synproxy_icmp_seq_translated_total", {}),
    **{f"synproxy_reuse_{s}": ("ipvs_synproxy_session_reuses_total", {"from_state": s})
       for s in ("close", "time_wait", "fin_wait", "close_wait", "last_ack")},
    **{f"sync_opt_{r}": ("ipvs_synproxy_sync_options_total", {"result": r})
       for r in ("sent", "received", "rejected")},
    "sync_fnat_stolen": ("ipvs_synproxy_sync_fullnat_stolen_total", {}),
}
