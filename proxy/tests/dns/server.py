"""A DNS server for the discovery tests, on a loopback UDP port.

It answers from a JSON zone file that the test rewrites while it runs
(read again for every query, so an edit applies at once):

    {"ttl": 1, "servfail": false,
     "names": {"up.test.": {"A": ["127.0.0.1"]},
               "_api._tcp.test.": {"SRV": [[9101, "up.test."]]}}}

A name not in the zone gets NXDOMAIN; a known name without records of the
asked type gets an empty NOERROR answer; "servfail": true answers every
query with SERVFAIL. The port it listens on is the first line it prints.
"""

import argparse
import json
import socket

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord

RDATA = {
    "A": lambda value: A(value),
    "AAAA": lambda value: AAAA(value),
    "SRV": lambda value: SRV(priority=0, weight=1, port=value[0], target=value[1]),
}


def answer(query, zone):
    reply = query.reply()
    if zone.get("servfail"):
        reply.header.rcode = RCODE.SERVFAIL
        return reply
    name = str(query.q.qname).lower()
    records = zone["names"].get(name)
    if records is None:
        reply.header.rcode = RCODE.NXDOMAIN
        return reply
    kind = QTYPE[query.q.qtype]
    for value in records.get(kind, []):
        reply.add_answer(RR(name, query.q.qtype, rdata=RDATA[kind](value), ttl=zone["ttl"]))
    return reply


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zone", required=True, help="the JSON zone file")
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - a garbled packet gets no answer
            continue
        with open(args.zone, encoding="utf-8") as f:
            zone = json.load(f)
        sock.sendto(answer(query, zone).pack(), peer)


if __name__ == "__main__":
    main()
