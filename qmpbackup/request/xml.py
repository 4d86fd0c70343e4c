"""libvirt's XML, read and written: ``<domainbackup>`` and ``<domaincheckpoint>``.

The formats are libvirt's (https://libvirt.org/formatbackup.html,
https://libvirt.org/formatcheckpoint.html), with one qmpbackup extension:
``<disk reuse='yes'>`` allows writing into an existing target or scratch file.

Reading turns a document into the plain fields of a model; the loader
(:mod:`qmpbackup.request.loader`) validates them, so that its messages speak
the document's vocabulary.  Unknown elements and attributes are refused, except
the read-only parts of ``virsh checkpoint-dumpxml`` output (``<creationTime>``,
``<parent>``, ``<domain>``, ``<disk size=…>``), which are ignored so that a
dumped checkpoint loads as-is.  Documents are parsed with defusedxml; any
DOCTYPE is refused (so no entity expansion).

Writing turns a model into a document that loads back as an equal model, laid
out as libvirt's documentation and the slides write it, by
:func:`~qmpbackup.request.render.render_xml`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any
from xml.etree.ElementTree import Element, ParseError
from xml.parsers.expat import ErrorString

import defusedxml
import defusedxml.ElementTree as DefusedET

from qmpbackup.request.models import (
    BackupSpec,
    CheckpointSpec,
    DiskBackupSpec,
    EncryptionSpec,
    ServerSpec,
)
from qmpbackup.request.problem import InvalidDocument, disk_label, shorten
from qmpbackup.request.render import Quote, XmlElement, render_xml

__all__ = [
    "Quote",
    "XmlElement",
    "backup_from_xml",
    "backup_to_xml",
    "checkpoint_from_xml",
    "checkpoint_to_xml",
    "parse_xml",
    "render_xml",
]

_Data = dict[str, Any]

# --------------------------------------------------------------------------
# Reading


def parse_xml(data: str | bytes, skipped_lines: int, root: str) -> Element:
    """Parse a document whose root element must be ``root``.

    ``skipped_lines`` (blank lines cut from the front) keeps error lines true.
    Raises InvalidDocument.
    """
    try:
        element: Element = DefusedET.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except ParseError as err:
        line, column = err.position
        raise InvalidDocument(
            f"invalid XML: {ErrorString(err.code)} "
            f"(line {line + skipped_lines}, column {column + 1})"
        ) from None
    except UnicodeError:
        # Only a str with lone surrogates gets here; expat never sees it.
        raise InvalidDocument("invalid XML: text is not valid Unicode") from None
    except defusedxml.DTDForbidden:
        raise InvalidDocument("XML DOCTYPE declarations are not accepted") from None
    except defusedxml.EntitiesForbidden:
        raise InvalidDocument("XML entity declarations are not accepted") from None
    except defusedxml.ExternalReferenceForbidden:
        raise InvalidDocument("external XML references are not accepted") from None
    except (LookupError, ValueError) as err:
        # expat's answer to an unknown or multi-byte declared encoding.
        raise InvalidDocument(f"invalid XML: unsupported encoding ({err})") from None
    if element.tag != root:
        raise InvalidDocument(f"root element is <{element.tag}>, expected <{root}>")
    return element


def _attrs(el: Element, allowed: Collection[str], where: str) -> dict[str, str]:
    for name in el.attrib:
        if name not in allowed:
            raise InvalidDocument(f"{where}unknown attribute {name!r} on <{el.tag}>")
    return dict(el.attrib)


def _children(
    el: Element, allowed: Collection[str], where: str, ignored: Collection[str] = ()
) -> dict[str, Element]:
    """Child elements of ``el`` by tag; text between them is refused."""
    _no_text(el.text, el, where)
    found: dict[str, Element] = {}
    for child in el:
        _no_text(child.tail, el, where)
        if child.tag in ignored:
            continue
        if child.tag not in allowed:
            raise InvalidDocument(f"{where}unknown element <{child.tag}> in <{el.tag}>")
        if child.tag in found and child.tag != "disk":
            raise InvalidDocument(f"{where}<{child.tag}> is given twice in <{el.tag}>")
        found.setdefault(child.tag, child)
    return found


def _no_text(text: str | None, el: Element, where: str) -> None:
    if text is not None and text.strip():
        raise InvalidDocument(f"{where}unexpected text {shorten(text.strip())!r} in <{el.tag}>")


def _text(el: Element, where: str = "") -> str:
    """Text of a leaf element such as ``<name>``, blanks stripped."""
    _attrs(el, (), where)
    if len(el):
        raise InvalidDocument(f"{where}unexpected element <{el[0].tag}> in <{el.tag}>")
    text = (el.text or "").strip()
    if not text:
        raise InvalidDocument(f"{where}<{el.tag}> is empty")
    return text


def _choice(value: str, choices: Mapping[str, bool], label: str) -> bool:
    # libvirt spells booleans 'yes'/'no', but 'on'/'off' for shallow: keep each strict.
    if value not in choices:
        raise InvalidDocument(f"{label} {value!r} is not one of {', '.join(choices)}")
    return choices[value]


_YES_NO = {"yes": True, "no": False}
_ON_OFF = {"on": True, "off": False}


# What only libvirt itself can give meaning to: refused, saying why.
_STATUS_XML = "is libvirt's internal status XML, not a request"
_LIBVIRT_ONLY_ELEMENTS = {
    "privateData": f"<privateData> {_STATUS_XML}",
    "active": f"<active> {_STATUS_XML}",
}
_LIBVIRT_ONLY_ATTRIBUTES = {
    "state": f"attribute 'state' {_STATUS_XML}",
    "index": f"attribute 'index' {_STATUS_XML}",
    "fdgroup": "server fdgroup needs libvirt's fd passing (virDomainFDAssociate): "
    "use transport tcp or unix",
}

# <seclabel> only asks libvirt's security driver to (not) relabel a file: qmpbackup
# relabels nothing, so it is accepted and ignored.
_IGNORED_IN_FILE = ("seclabel",)


def _libvirt_only(el: Element, where: str) -> None:
    """Refuse, with the reason, attributes and children only libvirt gives meaning to."""
    for name in el.attrib:
        if name in _LIBVIRT_ONLY_ATTRIBUTES:
            raise InvalidDocument(f"{where}{_LIBVIRT_ONLY_ATTRIBUTES[name]}")
    for child in el:
        if child.tag in _LIBVIRT_ONLY_ELEMENTS:
            raise InvalidDocument(f"{where}{_LIBVIRT_ONLY_ELEMENTS[child.tag]}")


def backup_from_xml(root: Element) -> _Data:
    """The fields of a :class:`BackupSpec` from a parsed ``<domainbackup>``.

    Raises InvalidDocument for what the format does not allow.
    """
    _libvirt_only(root, "")
    fields: _Data = dict(_attrs(root, ("mode",), ""))
    children = _children(root, ("incremental", "server", "disks"), "")
    if "incremental" in children:
        fields["incremental"] = _text(children["incremental"])
    if "server" in children:
        server = children["server"]
        _libvirt_only(server, "")
        _children(server, (), "server: ")
        attrs: _Data = dict(_attrs(server, ("transport", "name", "port", "socket", "tls"), ""))
        if "tls" in attrs:
            attrs["tls"] = _choice(attrs["tls"], _YES_NO, "server tls")
        fields["server"] = attrs
    if "disks" in children:
        disks = children["disks"]
        _attrs(disks, (), "")
        _children(disks, ("disk",), "")
        fields["disks"] = [_backup_disk(disk, i) for i, disk in enumerate(disks)]
    return fields


def _backup_disk(el: Element, index: int) -> _Data:
    where = disk_label(el.attrib, index) + ": "
    allowed = (
        "name",
        "backup",
        "backupmode",
        "incremental",
        "exportname",
        "exportbitmap",
        "type",
        "reuse",
    )
    _libvirt_only(el, where)
    disk: _Data = dict(_attrs(el, allowed, where))
    for flag in ("backup", "reuse"):
        if flag in disk:
            disk[flag] = _choice(disk[flag], _YES_NO, where + flag)
    children = _children(el, ("target", "scratch", "driver"), where)
    for tag in ("target", "scratch"):
        if tag in children:
            _store(children[tag], disk, where)
    if "driver" in children:
        driver = _leaf(children["driver"], ("type", "shallow"), where)
        if "type" in driver:
            disk["format"] = driver["type"]
        if "shallow" in driver:
            disk["shallow"] = _choice(driver["shallow"], _ON_OFF, where + "driver shallow")
    return disk


def _store(el: Element, disk: _Data, where: str) -> None:
    """A ``<target>`` or ``<scratch>``: its file (``type='file'``) or device
    (``type='block'``), and its ``<encryption>``, into ``disk``."""
    attrs = _attrs(el, ("file", "dev"), where)
    block = disk.get("type") == "block"
    if "dev" in attrs and not block:
        raise InvalidDocument(f"{where}<{el.tag} dev=…/> is a block device: it needs type='block'")
    if "file" in attrs and block:
        raise InvalidDocument(f"{where}type='block' names its device with <{el.tag} dev=…/>")
    path = attrs.get("dev" if block else "file")
    if path is not None:
        disk[el.tag] = path
    children = _children(el, ("encryption",), where, _IGNORED_IN_FILE)
    if "encryption" in children:
        disk["encryption"] = _encryption(children["encryption"], where)


def _encryption(el: Element, where: str) -> _Data:
    """``<encryption format='luks'><secret type='passphrase' uuid=|usage=/></encryption>``."""
    fields: _Data = dict(_attrs(el, ("format",), where))
    if "format" not in fields:
        raise InvalidDocument(f"{where}<encryption> needs format='luks'")
    children = _children(el, ("secret",), where)
    if "secret" not in children:
        raise InvalidDocument(f"{where}<encryption> needs a <secret type='passphrase' uuid=…/>")
    fields["secret"] = _leaf(children["secret"], ("type", "uuid", "usage"), where)
    return fields


def _leaf(
    el: Element, allowed: Collection[str], where: str, ignored: Collection[str] = ()
) -> dict[str, str]:
    """Attributes of an element that has neither text nor children (but ``ignored`` ones)."""
    _children(el, (), where, ignored)
    return _attrs(el, allowed, where)


# Read-only in `checkpoint-dumpxml` output (<parent>, <creationTime>: --redefine's).
_CHECKPOINT_IGNORED = ("domain",)


def checkpoint_from_xml(root: Element) -> _Data:
    """The fields of a :class:`CheckpointSpec` from a parsed ``<domaincheckpoint>``.

    Raises InvalidDocument for what the format does not allow.
    """
    _libvirt_only(root, "")
    _attrs(root, (), "")
    known = ("name", "description", "disks", "parent", "creationTime")
    children = _children(root, known, "", _CHECKPOINT_IGNORED)
    fields: _Data = {"name": _text(children["name"])} if "name" in children else {}
    if "creationTime" in children:
        fields["creation_time"] = _text(children["creationTime"])
    if "parent" in children:
        parent = _children(children["parent"], ("name",), "<parent>: ")
        fields["parent"] = _text(parent["name"]) if "name" in parent else ""
    if "description" in children:
        description = children["description"]
        _attrs(description, (), "")
        if len(description):
            raise InvalidDocument(f"unexpected element <{description[0].tag}> in <description>")
        # Kept verbatim: it is free text, and libvirt keeps it so.
        fields["description"] = description.text or ""
    if "disks" in children:
        disks = children["disks"]
        _attrs(disks, (), "")
        _children(disks, ("disk",), "")
        fields["disks"] = [_checkpoint_disk(disk, i) for i, disk in enumerate(disks)]
    return fields


def _checkpoint_disk(el: Element, index: int) -> _Data:
    where = disk_label(el.attrib, index) + ": "
    # 'size' is what `checkpoint-dumpxml --size` reports, 'persistent' what it says of a
    # bitmap kept only by the running QEMU (a raw disk's, in a one-shot backup's
    # checkpoint); they are outputs only.
    attrs = _leaf(el, ("name", "checkpoint", "bitmap", "size", "persistent"), where)
    attrs.pop("size", None)
    attrs.pop("persistent", None)
    return dict(attrs)


# --------------------------------------------------------------------------
# Writing


def backup_to_xml(spec: BackupSpec) -> str:
    """``spec`` as a ``<domainbackup>`` document that loads back as an equal model.

    Fields at their default are left out, but ``mode``; a disk says
    ``type="file"`` when it has a target, a scratch or a driver.  Raises
    ValueError for a character that XML 1.0 cannot carry (in a path, say).
    """
    children: list[XmlElement] = []
    if spec.incremental is not None:
        children.append(XmlElement("incremental", text=spec.incremental))
    if spec.server is not None:
        children.append(_server_element(spec.server))
    if spec.disks:
        children.append(
            XmlElement("disks", children=[_disk_element(d, spec.mode) for d in spec.disks])
        )
    return render_xml(XmlElement("domainbackup", {"mode": spec.mode}, children=children))


def _server_element(server: ServerSpec) -> XmlElement:
    attrs = {
        "transport": None if server.transport == "tcp" else server.transport,
        "name": server.name,
        "port": None if server.port is None else str(server.port),
        "socket": server.socket,
        "tls": "yes" if server.tls else None,
    }
    return XmlElement("server", attrs)


def _disk_element(disk: DiskBackupSpec, mode: str) -> XmlElement:
    stores = {"target": disk.target, "scratch": disk.scratch}
    path_attr = "dev" if disk.type == "block" else "file"
    encryption = None if disk.encryption is None else [_encryption_element(disk.encryption)]
    children = [
        XmlElement(tag, {path_attr: path}, children=encryption)
        for tag, path in stores.items()
        if path is not None
    ]
    if encryption and not children:
        # A default target or scratch, encrypted: <target> without its file.
        children.append(XmlElement("target" if mode == "push" else "scratch", children=encryption))
    if disk.format is not None or disk.shallow:
        shallow = "on" if disk.shallow else None
        children.append(XmlElement("driver", {"type": disk.format, "shallow": shallow}))
    attrs = {
        "name": disk.name,
        "backup": None if disk.backup else "no",
        "backupmode": disk.backupmode,
        "incremental": disk.incremental,
        "exportname": disk.exportname,
        "exportbitmap": disk.exportbitmap,
        "type": disk.type if children else None,
        "reuse": "yes" if disk.reuse else None,
    }
    return XmlElement("disk", attrs, children=children or None)


def _encryption_element(encryption: EncryptionSpec) -> XmlElement:
    secret = encryption.secret
    attrs = {"type": secret.type, "uuid": secret.uuid, "usage": secret.usage}
    return XmlElement(
        "encryption", {"format": encryption.format}, children=[XmlElement("secret", attrs)]
    )


def checkpoint_to_xml(spec: CheckpointSpec) -> str:
    """``spec`` as a ``<domaincheckpoint>`` document that loads back as an equal model.

    Fields at their default are left out.  Raises ValueError for a character
    that XML 1.0 cannot carry (in the description, say).
    """
    children = [] if spec.name is None else [XmlElement("name", text=spec.name)]
    if spec.description is not None:
        children.append(XmlElement("description", text=spec.description))
    if spec.parent is not None:
        children.append(XmlElement("parent", children=[XmlElement("name", text=spec.parent)]))
    if spec.creation_time is not None:
        children.append(XmlElement("creationTime", text=str(spec.creation_time)))
    if spec.disks:
        kinds = [None if d.checkpoint == "bitmap" else d.checkpoint for d in spec.disks]
        disks = [
            XmlElement("disk", {"name": d.name, "checkpoint": kind, "bitmap": d.bitmap})
            for d, kind in zip(spec.disks, kinds, strict=True)
        ]
        children.append(XmlElement("disks", children=disks))
    return render_xml(XmlElement("domaincheckpoint", children=children))
