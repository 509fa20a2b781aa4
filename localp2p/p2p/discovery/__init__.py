"""Peer discovery: mDNS on the LAN (:mod:`.mdns`) and the Kademlia DHT beyond it (:mod:`.dht`).

Both discovery services only *emit candidates* (:mod:`.candidate`): a
:class:`Candidate` says "this peer id was announced with these addresses".
Nothing here connects to a candidate for its own sake, authenticates it or
decides whether it is a member of our network; the consumer (auth, then the
worker set) does that. Candidates are hints and may repeat: the same peer can be
reported again (re-announcements, address changes, periodic DHT re-emission), so
consumers key their state by ``peer_id``. Only mDNS reports a peer ``gone``.

:mod:`.dht` also owns the node's Kademlia DHT itself (:class:`NodeDHT`,
:func:`run_dht`): in localp2p the DHT is there for rendezvous only.
"""

from ..addresses import advertisable_addrs
from .candidate import Candidate, Source
from .dht import (
    DHT_INITIAL_INTERVAL,
    DHT_MAX_INTERVAL,
    DHT_REEMIT_INTERVAL,
    DHT_REPROVIDE_INTERVAL,
    KAD_PROTOCOL_ID,
    DHTMode,
    NodeDHT,
    add_dht_peer,
    content_key,
    open_dht,
    run_dht,
    run_dht_discovery,
)
from .mdns import MDNS_REANNOUNCE_INTERVAL, MDNS_RECORD_TTL, run_mdns

__all__ = [
    "DHT_INITIAL_INTERVAL",
    "DHT_MAX_INTERVAL",
    "DHT_REEMIT_INTERVAL",
    "DHT_REPROVIDE_INTERVAL",
    "KAD_PROTOCOL_ID",
    "MDNS_REANNOUNCE_INTERVAL",
    "MDNS_RECORD_TTL",
    "Candidate",
    "DHTMode",
    "NodeDHT",
    "Source",
    "add_dht_peer",
    "advertisable_addrs",
    "content_key",
    "open_dht",
    "run_dht",
    "run_dht_discovery",
    "run_mdns",
]
