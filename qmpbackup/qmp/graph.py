"""Block-graph discovery: guest disks, their nodes, backing chains and bitmaps.

:func:`build_graph` is pure: it turns the replies of ``query-block``,
``query-named-block-nodes`` and ``x-debug-query-block-graph`` into a
:class:`BlockGraph`.  :func:`discover` asks a live QEMU for those replies.
The debug query is the only one that names child nodes in QEMU 7.2; without
it, children are matched by file name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import UnknownDiskError
from .session import CommandRunner

# Drivers that sit above the format node without changing what the guest sees.
FILTER_DRIVERS = frozenset(
    {"throttle", "copy-on-read", "preallocate", "compress", "blkdebug", "copy-before-write"}
)
PROTOCOL_DRIVERS = frozenset(
    {"file", "host_device", "host_cdrom", "nbd", "nvme", "null-co", "null-aio", "iscsi", "rbd"}
)
# The QOM path of the machine's flash devices (pc and q35: pflash0 code, pflash1 NVRAM).
SYSTEM_FLASH = "/machine/system.flash"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Bitmap(_Frozen):
    """A dirty bitmap as QEMU reports it."""

    name: str
    granularity: int
    count: int
    recording: bool = True
    persistent: bool = False
    busy: bool = False
    inconsistent: bool = False


class BlockNode(_Frozen):
    """One node of the block graph."""

    node_name: str
    driver: str
    filename: str
    read_only: bool = False
    virtual_size: int = 0
    cluster_size: int | None = None
    backing_filename: str | None = None
    file_child: str | None = None
    backing_child: str | None = None
    bitmaps: tuple[Bitmap, ...] = ()

    def bitmap(self, name: str) -> Bitmap | None:
        """The bitmap called ``name`` on this node, if any."""
        return next((b for b in self.bitmaps if b.name == name), None)


class Disk(_Frozen):
    """A guest disk: its frontend name, the node it is attached to, and its chain."""

    name: str
    backend: str
    qdev: str
    root_node: str
    chain: tuple[str, ...]
    read_only: bool = False

    @property
    def top(self) -> str:
        """The top format node: where checkpoints live and backups read from."""
        return self.chain[0]

    @property
    def firmware_code(self) -> bool:
        """A read-only flash of the machine (pflash0 holding OVMF_CODE): the firmware the
        host's package installed, not the VM's data (its NVRAM is a writable flash)."""
        return self.read_only and self.qdev.startswith(SYSTEM_FLASH)


class BitmapLayer(_Frozen):
    """A bitmap found on one layer of a disk's backing chain."""

    node: str
    bitmap: Bitmap


class BlockGraph(_Frozen):
    """Disks and nodes of one QEMU, as discovered at one moment."""

    nodes: Mapping[str, BlockNode]
    disks: Mapping[str, Disk]
    aliases: Mapping[str, str] = {}

    def disk(self, name: str) -> Disk:
        """The disk called ``name`` (qdev id or BlockBackend name)."""
        key = self.aliases.get(name, name)
        if key not in self.disks:
            known = ", ".join(sorted(self.disks)) or "none"
            raise UnknownDiskError(f"unknown disk {name!r} (disks: {known})")
        return self.disks[key]

    def node(self, name: str) -> BlockNode:
        """The node called ``name``."""
        return self.nodes[name]

    def image_path(self, node: BlockNode) -> str:
        """The host file behind a format node: its protocol child's file name, found
        through filters (blkdebug, throttle, …) whose own names are ``json:`` strings."""
        child = self.nodes.get(node.file_child or "")
        while child is not None and child.driver in FILTER_DRIVERS:
            below = self.nodes.get(child.file_child or "")
            if below is None:
                break
            child = below
        return node.filename if child is None else child.filename

    def chain_nodes(self, disk: str) -> list[BlockNode]:
        """The format layers of ``disk``, top first."""
        return [self.nodes[n] for n in self.disk(disk).chain]

    def top_node(self, disk: str) -> BlockNode:
        """The top format node of ``disk``."""
        return self.nodes[self.disk(disk).top]

    def bitmap_layers(self, disk: str, bitmap: str) -> list[BitmapLayer]:
        """Every layer of ``disk``'s chain holding a bitmap named ``bitmap``, top first."""
        return [
            BitmapLayer(node=node.node_name, bitmap=found)
            for node in self.chain_nodes(disk)
            if (found := node.bitmap(bitmap)) is not None
        ]

    def nodes_with_prefix(self, prefix: str) -> list[str]:
        """Node names starting with ``prefix``."""
        return sorted(n for n in self.nodes if n.startswith(prefix))

    def bitmaps_with_prefix(self, prefix: str) -> list[BitmapLayer]:
        """Bitmaps anywhere in the graph whose names start with ``prefix``."""
        return [
            BitmapLayer(node=node.node_name, bitmap=b)
            for node in self.nodes.values()
            for b in node.bitmaps
            if b.name.startswith(prefix)
        ]


def disk_name_from_qdev(qdev: str) -> str | None:
    """The qdev id of a frontend, from ``query-block``'s ``qdev`` path or id; ``pflashN``
    for the machine's flash N (``/machine/system.flashN``, which has no qdev id, and whose
    BlockBackend is called ``pflashN`` when it was attached with ``-drive if=pflash``)."""
    if not qdev:
        return None
    if not qdev.startswith("/"):
        return qdev
    if qdev.startswith(SYSTEM_FLASH) and qdev[len(SYSTEM_FLASH) :].isdigit():
        return "pflash" + qdev[len(SYSTEM_FLASH) :]
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    return None


def _node_from_info(info: Mapping[str, Any]) -> BlockNode:
    image = info.get("image", {})
    bitmaps = tuple(
        Bitmap(
            name=b["name"],
            granularity=b["granularity"],
            count=b["count"],
            recording=b.get("recording", True),
            persistent=b.get("persistent", False),
            busy=b.get("busy", False),
            inconsistent=b.get("inconsistent", False),
        )
        for b in info.get("dirty-bitmaps", [])
        # A running backup job keeps an anonymous bitmap of its own; it is not a checkpoint.
        if "name" in b
    )
    return BlockNode(
        node_name=info["node-name"],
        driver=info["drv"],
        filename=info.get("file", ""),
        read_only=info.get("ro", False),
        virtual_size=image.get("virtual-size", 0),
        cluster_size=image.get("cluster-size"),
        backing_filename=info.get("backing_file"),
        bitmaps=bitmaps,
    )


def _children_from_debug_graph(
    debug_graph: Mapping[str, Any],
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Child edges by node name, and root node by backend name."""
    names = {n["id"]: n["name"] for n in debug_graph["nodes"]}
    kinds = {n["id"]: n["type"] for n in debug_graph["nodes"]}
    children: dict[str, dict[str, str]] = {}
    roots: dict[str, str] = {}
    for edge in debug_graph["edges"]:
        parent, child = edge["parent"], edge["child"]
        if kinds.get(parent) == "block-backend":
            roots[names[parent]] = names[child]
        elif kinds.get(parent) == "block-driver":
            children.setdefault(names[parent], {})[edge["name"]] = names[child]
    return children, roots


def _children_by_filename(nodes: Mapping[str, BlockNode]) -> dict[str, dict[str, str]]:
    """Guess child edges from file names, for a QEMU without the debug graph."""
    children: dict[str, dict[str, str]] = {}
    protocol = {n.filename: n.node_name for n in nodes.values() if n.driver in PROTOCOL_DRIVERS}
    formats = {
        n.filename: n.node_name
        for n in nodes.values()
        if n.driver not in PROTOCOL_DRIVERS and n.driver not in FILTER_DRIVERS
    }
    for node in nodes.values():
        edges: dict[str, str] = {}
        if node.driver not in PROTOCOL_DRIVERS and node.filename in protocol:
            edges["file"] = protocol[node.filename]
        if node.backing_filename and node.backing_filename in formats:
            edges["backing"] = formats[node.backing_filename]
        children[node.node_name] = edges
    return children


def _format_chain(nodes: Mapping[str, BlockNode], root: str) -> tuple[str, ...]:
    """Format layers below ``root``: filters skipped, backing links followed."""
    chain: list[str] = []
    current: str | None = root
    while current is not None and current in nodes:
        node = nodes[current]
        if node.driver in FILTER_DRIVERS:
            current = node.file_child
            continue
        chain.append(current)
        current = node.backing_child
    return tuple(chain)


def build_graph(
    block: Sequence[Mapping[str, Any]],
    named_nodes: Sequence[Mapping[str, Any]],
    debug_graph: Mapping[str, Any] | None = None,
) -> BlockGraph:
    """Build a :class:`BlockGraph` from QEMU's query replies."""
    nodes = {info["node-name"]: _node_from_info(info) for info in named_nodes}
    if debug_graph is not None:
        children, _ = _children_from_debug_graph(debug_graph)
    else:
        children = _children_by_filename(nodes)
    for name, edges in children.items():
        if name in nodes:
            child = edges.get("file") or edges.get("image")
            nodes[name] = nodes[name].model_copy(
                update={"file_child": child, "backing_child": edges.get("backing")}
            )
    disks: dict[str, Disk] = {}
    aliases: dict[str, str] = {}
    for entry in block:
        inserted = entry.get("inserted")
        if not inserted:
            continue
        backend = entry.get("device", "")
        qdev = entry.get("qdev", "")
        root = inserted["node-name"]
        # A frontend with neither a qdev id nor a BlockBackend name: its node's name.
        name = disk_name_from_qdev(qdev) or backend or root
        disks[name] = Disk(
            name=name,
            backend=backend,
            qdev=qdev,
            root_node=root,
            chain=_format_chain(nodes, root),
            read_only=inserted.get("ro", False),
        )
        if backend and backend != name:
            aliases[backend] = name
    return BlockGraph(nodes=nodes, disks=disks, aliases=aliases)


async def query_graph_replies(qmp: CommandRunner, debug: bool = True) -> dict[str, Any]:
    """The raw replies :func:`build_graph` needs, keyed by command name."""
    replies: dict[str, Any] = {
        "query-block": await qmp.execute("query-block"),
        "query-named-block-nodes": await qmp.execute("query-named-block-nodes", {"flat": True}),
    }
    if debug:
        replies["x-debug-query-block-graph"] = await qmp.execute("x-debug-query-block-graph")
    return replies


def graph_from_replies(replies: Mapping[str, Any]) -> BlockGraph:
    """:func:`build_graph` over a mapping as :func:`query_graph_replies` returns."""
    return build_graph(
        replies["query-block"],
        replies["query-named-block-nodes"],
        replies.get("x-debug-query-block-graph"),
    )


async def discover(qmp: CommandRunner, debug: bool = True) -> BlockGraph:
    """Query QEMU and build its current block graph."""
    return graph_from_replies(await query_graph_replies(qmp, debug))
