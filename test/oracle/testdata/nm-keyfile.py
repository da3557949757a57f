#!/usr/bin/python3
"""Reads NetworkManager keyfiles with libnm, the library NetworkManager
itself reads them with, and prints what it understood as one JSON object
per file: {"file", "warnings", "error", "settings"}. A keyfile that libnm
refuses, or that does not verify as a connection, has "error"; every
message libnm's keyfile reader would log (an unknown key, a value it
ignores) is in "warnings". Used by test/oracle/network_test.go.

Usage: nm-keyfile.py FILE...
"""
import json
import os
import sys

import gi

gi.require_version("NM", "1.0")
from gi.repository import GLib, NM  # noqa: E402


def read(path):
    warnings = []

    def handler(_kf, _conn, kind, info, _data):
        if kind == NM.KeyfileHandlerType.WARN:
            message, _severity = info.warn_get()
            warnings.append(message)
        return False

    kf = GLib.KeyFile()
    result = {"file": path, "warnings": warnings, "error": None, "settings": {}}
    try:
        kf.load_from_file(path, GLib.KeyFileFlags.NONE)
        conn = NM.keyfile_read(kf, os.path.dirname(os.path.abspath(path)), NM.KeyfileHandlerFlags.NONE, handler, None)
        conn.verify()
    except GLib.Error as e:
        result["error"] = e.message
        return result
    s = result["settings"]
    c = conn.get_setting_connection()
    s["id"] = c.get_id()
    s["type"] = c.get_connection_type()
    s["interface-name"] = c.get_interface_name()
    eth = conn.get_setting_wired()
    if eth is not None:
        s["mac-address"] = eth.get_mac_address()
    vlan = conn.get_setting_vlan()
    if vlan is not None:
        s["vlan-id"] = vlan.get_id()
        s["vlan-parent"] = vlan.get_parent()
    for name, ip in (("ipv4", conn.get_setting_ip4_config()), ("ipv6", conn.get_setting_ip6_config())):
        if ip is None:
            continue
        s[name] = {
            "method": ip.get_method(),
            "addresses": ["%s/%d" % (a.get_address(), a.get_prefix()) for a in (ip.get_address(i) for i in range(ip.get_num_addresses()))],
            "gateway": ip.get_gateway(),
            "dns": [ip.get_dns(i) for i in range(ip.get_num_dns())],
        }
    return result


print(json.dumps([read(p) for p in sys.argv[1:]], indent=1))
