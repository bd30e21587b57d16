"""Dev tool: build the UI-format workflow (what the ComfyUI browser saves) from its API-format twin.

The API twin (``workflows/api/<name>.api.json``, what ``POST /prompt`` takes) is the source we edit;
this script writes ``workflows/<name>.json``, for users to drag into the browser. The twins sit in
``api/`` because ComfyUI offers every ``workflows/*.json`` in its template browser. The node
definitions come from a running ComfyUI's ``/object_info`` (or a saved copy of it), because the UI
format stores widget values as a bare list whose order is the frontend's:

- widgets are the node's INT, FLOAT, STRING, BOOLEAN and COMBO inputs (not ``forceInput``), in
  ``input_order``, required before optional;
- an INT input with ``control_after_generate`` (or, when that is unset, one named ``seed`` or
  ``noise_seed``) is followed by the value of its "control after generate" widget;
- every other input is a socket, listed in ``inputs`` with its link id (or null if unconnected).

Nodes are laid out left to right by graph depth, and a ``Note`` node (frontend-only) explains the
workflow. Regenerate every UI file, keeping each file's current Note text, with ComfyUI running::

    python tools/api_to_ui.py workflows/api/*.api.json --object-info http://127.0.0.1:8188

``--note TEXT`` (with one file) sets the Note text instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these unless told not to
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"  # the frontend's "yellow" node colour, used for notes
COLUMN_GAP, ROW_GAP, MARGIN = 80, 40, 50


# -- node definitions -----------------------------------------------------------------------------
def load_object_info(source: str) -> dict:
    """/object_info from a server address (http://host:port) or a JSON file saved from it."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as response:
            return json.load(response)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--object-info {source!r} is neither an http:// address nor a file; "
                                "give the address of a running ComfyUI or a saved /object_info JSON.")
    return json.loads(path.read_text())


def input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every input, required before optional, in the node's declared order."""
    declared = info.get("input", {})
    order = info.get("input_order") or {part: list(declared.get(part, {})) for part in ("required", "optional")}
    return [(name, declared[part][name]) for part in ("required", "optional") for name in order.get(part, [])]


def is_widget(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not options.get("forceInput", False)


def has_control_widget(name: str, spec: list) -> bool:
    """True if the frontend adds a "control after generate" widget after this input."""
    options = spec[1] if len(spec) > 1 else {}
    if spec[0] == "INT":
        control = options.get("control_after_generate")
        return bool(name in SEED_NAMES if control is None else control)
    if options.get("control_after_generate"):
        raise ValueError(f"input {name!r}: control widgets on {spec[0]} inputs are not supported here")
    return False


def socket_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


# -- conversion -----------------------------------------------------------------------------------
def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _depths(api: dict) -> dict[str, int]:
    """Longest path from a source node, for the left-to-right layout."""
    depths: dict[str, int] = {}

    def depth(node_id: str, seen: tuple[str, ...] = ()) -> int:
        if node_id in seen:
            raise ValueError(f"the graph has a cycle through node {node_id}")
        if node_id not in depths:
            sources = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
            depths[node_id] = 1 + max((depth(s, seen + (node_id,)) for s in sources), default=-1)
        return depths[node_id]

    for node_id in api:
        depth(node_id)
    return depths


def _size(n_sockets: int, n_outputs: int, widgets: list[tuple[str, list]]) -> list[int]:
    """An estimate of LiteGraph's computeSize; the frontend enlarges nodes that are too small."""
    multiline = sum(1 for _, spec in widgets if len(spec) > 1 and spec[1].get("multiline"))
    width = 400 if multiline else 320
    height = 10 + max(n_sockets, n_outputs, 1) * 20 + 24 * len(widgets) + 96 * multiline
    return [width, height]


def api_to_ui(api: dict, object_info: dict, note: str, control: str = "fixed") -> dict:
    """The UI-format workflow of an API-format graph, with a Note node holding `note`.

    Args:
        api: ``{node_id: {"class_type", "inputs", "_meta": {"title"}}}`` with integer node ids.
        object_info: ComfyUI's ``/object_info`` (must list every class_type of `api`).
        note: text of the Note node.
        control: value of every "control after generate" widget (fixed, increment, decrement, randomize).

    Returns:
        The workflow dict in the format the browser saves (version 0.4).
    """
    if control not in CONTROL_VALUES:
        raise ValueError(f"control must be one of {', '.join(CONTROL_VALUES)}, got {control!r}")
    missing = sorted({n["class_type"] for n in api.values()} - set(object_info))
    if missing:
        raise ValueError(f"node types not registered in /object_info: {', '.join(missing)}; start ComfyUI "
                         "with this pack installed and check its log for import errors.")
    if not all(key.isdigit() for key in api):
        raise ValueError("API node ids must be integers (as strings) to become UI node ids")

    order = sorted(api, key=int)
    nodes: dict[str, dict] = {}
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    for node_id in order:
        entry = api[node_id]
        info = object_info[entry["class_type"]]
        specs = input_specs(info)
        unknown = set(entry["inputs"]) - {name for name, _ in specs}
        if unknown:
            raise ValueError(f"node {node_id} ({entry['class_type']}) has inputs it does not declare: "
                             f"{', '.join(sorted(unknown))}")
        widgets = [(name, spec) for name, spec in specs if is_widget(spec)]
        values, inputs = [], []
        for name, spec in widgets:
            # the browser always sends every widget, so the twin must hold them all to stay its exact twin
            if name not in entry["inputs"]:
                raise ValueError(f"node {node_id} ({entry['class_type']}) has no value for widget {name!r}; "
                                 "write every widget input into the API twin")
            value = entry["inputs"][name]
            if _is_link(value):
                raise ValueError(f"node {node_id}: widget {name!r} is linked; converted widgets are not supported")
            values.append(value)
            if has_control_widget(name, spec):
                values.append(control)
        for name, spec in specs:
            if is_widget(spec):
                continue
            value = entry["inputs"].get(name)
            link_id = None
            if value is not None:
                if not _is_link(value) or value[0] not in api:
                    raise ValueError(f"node {node_id}: input {name!r} must link to a node of the graph, got {value!r}")
                source_info = object_info[api[value[0]]["class_type"]]
                out_type = source_info["output"][value[1]]
                if spec[0] != "*" and out_type != spec[0]:
                    raise ValueError(f"node {node_id}: input {name!r} takes {spec[0]} but node {value[0]} "
                                     f"output {value[1]} is {out_type}")
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(node_id), len(inputs), out_type])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
            inputs.append({"name": name, "type": socket_type(spec), "link": link_id})
        node = {"id": int(node_id), "type": entry["class_type"], "pos": [0, 0],
                "size": _size(len(inputs), len(info["output"]), widgets), "flags": {}, "order": 0, "mode": 0,
                "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": entry["class_type"]},
                "widgets_values": values}
        title = entry.get("_meta", {}).get("title")
        if title and title != info.get("display_name", entry["class_type"]):
            node["title"] = title
        nodes[node_id] = node

    for node_id in order:
        info = object_info[api[node_id]["class_type"]]
        outputs = []
        for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"])):
            output = {"name": out_name, "type": out_type, "links": out_links.get((node_id, slot)) or None,
                      "slot_index": slot}
            if info.get("output_is_list", [False] * (slot + 1))[slot]:
                output["shape"] = 6  # the frontend's grid-shaped slot for list outputs
            outputs.append(output)
        nodes[node_id]["outputs"] = outputs

    # layout: one column per depth, the Note on top of the first; execution order by depth then id
    depths = _depths(api)
    note_id = max(int(i) for i in api) + 1
    note_node = {"id": note_id, "type": "Note", "pos": [0, 0], "size": [440, 220], "flags": {},
                 "order": len(api), "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
                 "widgets_values": [note], "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR}
    columns: dict[int, list[dict]] = {0: [note_node]}
    for rank, node_id in enumerate(sorted(order, key=lambda i: (depths[i], int(i)))):
        nodes[node_id]["order"] = rank
        columns.setdefault(depths[node_id], []).append(nodes[node_id])
    x = MARGIN
    for depth in sorted(columns):
        y = MARGIN
        for node in columns[depth]:
            node["pos"] = [x, y]
            y += node["size"][1] + ROW_GAP
        x += max(node["size"][0] for node in columns[depth]) + COLUMN_GAP

    return {"last_node_id": note_id, "last_link_id": len(links),
            "nodes": [nodes[i] for i in order] + [note_node], "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def existing_note(path: Path) -> str | None:
    """The text of the Note node of a UI workflow file, if the file exists and has one."""
    if not path.is_file():
        return None
    notes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "Note"]
    return notes[0]["widgets_values"][0] if notes else None


def ui_path(api_path: Path) -> Path:
    """workflows/<name>.json for workflows/api/<name>.api.json."""
    if not api_path.name.endswith(".api.json"):
        raise ValueError(f"{api_path} does not end in .api.json; name API twins <name>.api.json")
    folder = api_path.resolve().parent
    if folder.name != "api":
        raise ValueError(f"{api_path} is not in an api/ folder; keep API twins in workflows/api/ so that "
                         "ComfyUI's template browser lists only the UI files")
    return folder.parent / (api_path.name[: -len(".api.json")] + ".json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("api_files", nargs="+", type=Path, help="<name>.api.json files")
    parser.add_argument("--object-info", default="http://127.0.0.1:8188",
                        help="ComfyUI address or a saved /object_info JSON (default: %(default)s)")
    parser.add_argument("--note", help="Note text (one input file only); default: keep the current one")
    parser.add_argument("--control", default="fixed", choices=CONTROL_VALUES,
                        help="value of 'control after generate' widgets (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.note is not None and len(args.api_files) != 1:
        parser.error("--note applies to one workflow; give a single .api.json file")
    object_info = load_object_info(args.object_info)
    for api_path in args.api_files:
        out = ui_path(api_path)
        note = args.note if args.note is not None else existing_note(out)
        if note is None:
            parser.error(f"{out} has no Note yet; give its text with --note")
        ui = api_to_ui(json.loads(api_path.read_text()), object_info, note, args.control)
        out.write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out} ({len(ui['nodes'])} nodes, {len(ui['links'])} links)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
