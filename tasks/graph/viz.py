"""Graph attention pictures (``zoo viz graph``): a node's neighbourhood with edge widths proportional to
the attention it pays to each neighbour, one panel per head.

The weights come from the layers' ``return_attention_weights`` (PyG protocol: (edge_index with the
self loops that were added, alpha [E', H])); the picture shows the incoming edges j -> i of the chosen
node i (its self loop as a ring), their alpha as width and label, plus the 2-hop context in grey.

    zoo viz graph [data=karate] [node=0] [layer=0] [seed=0] [root=<folder, for data=planetoid:<Name> | ogb:<name>>]
                  [out=graph_attention.png] (ckpt=<.ckpt | released dir | run dir> | [model=gatv2_node]
                  [heads=<the model's>] [epochs=100])
    zoo viz graph data=dictlookup [k=10] [example=0] [node=0] [out=...]
                  (ckpt=<.ckpt | released dir | run dir> |
                   [model=gatv2_dictlookup|gat_dictlookup|transformer_dictlookup] [heads=1] [epochs=5] [seed=11])

``model``, ``heads`` and ``epochs`` (and ``seed`` of data=dictlookup) choose and train the model drawn, so they apply
only without ``ckpt``: the checkpoint fixes the model, and giving them with it is refused.

Node data: without ``ckpt`` the model is trained full-batch for ``epochs`` steps first (Adam 5e-3, the GAT
recipe) so the picture shows learned attention. ``ckpt`` is read as ``zoo eval`` / ``zoo predict`` read it: a
``.ckpt`` of ``zoo train`` (its EMA weights where the run kept them), a ``released/`` folder (or any directory of
``zoo.save_pretrained``), or a ``zoo train`` run directory (its released/, else checkpoints/best.ckpt, else
last.ckpt). With ``ckpt``, the data it was trained on is used (the run's recorded data config: name, root, seed,
loader options, k and the DictionaryLookup split; its root as the absolute path the data module recorded,
``metadata.data.root``), with or without ``data=`` naming that data: the keys you leave unset take the recorded
values, and a ``seed=`` (the graph and split seed of node data) or ``k=`` that contradicts the record is refused.
``data=`` naming other data is drawn on that data (a model of another width or kind is refused). Without a record
the default is karate. ``root=`` expands ``~``.

``data=dictlookup``: the DictionaryLookup benchmark (zoo.tasks.graph.dictlookup). The picture is query ``node``
(0..k-1) of test example ``example`` (a permutation from the unseen-combination test split) attending to the k
key-value nodes, labelled key:value, with the one holding its key in green. Without ``ckpt`` the model is
trained for ``epochs`` passes over the training split first (each epoch a new permutation of it, so every
training graph once; Adam 1e-3, gradient clipping 1.0, batches of 1024, seed 11, as ``zoo train
experiment=graph_dictlookup``; ``seed=`` seeds that training, so with ``ckpt`` it is refused: the checkpoint's
recorded split is drawn, its recorded data.seed included): GATv2 then puts its attention on the matching key,
while GAT's static attention cannot (Brody et al., ICLR 2022). Letters: N nodes, E edges, H heads.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from zoo.plotting import png_path, pyplot, save_figure

__all__ = ["neighbourhood_attention", "draw_neighbourhood", "main"]


def neighbourhood_attention(edge_index: torch.Tensor, alpha: torch.Tensor, node: int):
    """The incoming edges of ``node``: (sources [k], alpha [k, H])."""
    sel = edge_index[1] == node
    return edge_index[0, sel], alpha[sel]


def draw_neighbourhood(edge_index: torch.Tensor, alpha: torch.Tensor, node: int, out: str,
                       labels: Optional[torch.Tensor] = None, title: str = "",
                       names: Optional[dict] = None) -> str:
    """Write a PNG: one panel per head, edge width ~ attention of ``node`` to each in-neighbour.

    ``labels``: a class per node (node colours; a negative label, an unlabelled node, is drawn white);
    ``names``: node -> text drawn on it (default: the node id).
    """
    import networkx as nx

    plt = pyplot()
    path = png_path(out)

    src, a = neighbourhood_attention(edge_index, alpha.detach().float().cpu(), node)
    if src.numel() == 0:
        raise ValueError(f"node {node} has no incoming edges to draw")
    heads = a.size(1)
    nbrs = sorted(set(src.tolist()) | {node})
    # 2-hop context: edges into the neighbours (grey)
    ctx_mask = torch.isin(edge_index[1], torch.tensor(nbrs)) & (edge_index[0] != edge_index[1])
    G = nx.DiGraph()
    G.add_nodes_from(nbrs)
    for s, d in edge_index[:, ctx_mask].t().tolist():
        G.add_edge(s, d)
    pos = nx.spring_layout(G.to_undirected(), seed=0)
    fig, axes = plt.subplots(1, heads, figsize=(4.2 * heads, 4.2), squeeze=False)
    colours = None
    if labels is not None:
        cmap = plt.get_cmap("tab10")
        colours = [cmap(int(labels[v]) % 10) if int(labels[v]) >= 0 else "white" for v in G.nodes()]
    for h in range(heads):
        ax = axes[0, h]
        nx.draw_networkx_edges(G, pos, ax=ax, edge_color="#cccccc", width=0.6, arrows=False)
        per_source: dict[int, float] = {}  # a repeated edge (PyG keeps each copy in alpha) is drawn once, summed
        for s, w in zip(src.tolist(), a[:, h].tolist()):
            per_source[s] = per_source.get(s, 0.0) + w
        loop = per_source.pop(node, 0.0)
        edges = [(s, node) for s in per_source]
        widths = list(per_source.values())
        nx.draw_networkx_edges(G, pos, edgelist=edges, ax=ax, width=[0.5 + 10 * w for w in widths],
                               edge_color="tab:red", arrows=True, arrowsize=8)
        nx.draw_networkx_nodes(G, pos, ax=ax, node_size=[420 if v == node else 160 for v in G.nodes()],
                               node_color=colours or "tab:blue", edgecolors="black")
        nx.draw_networkx_labels(G, pos, ax=ax, font_size=7,
                                labels=None if names is None else {v: names.get(v, str(v)) for v in G.nodes()})
        nx.draw_networkx_edge_labels(G, pos, ax=ax, font_size=6,
                                     edge_labels={e: f"{w:.2f}" for e, w in zip(edges, widths)})
        if loop:
            x, y = pos[node]
            ax.add_patch(plt.Circle((x, y), 0.09, fill=False, color="tab:red",
                                    lw=0.5 + 10 * loop))
        ax.set_title(f"head {h}" + (f"  (self {loop:.2f})" if loop else ""), fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title or f"attention of node {node} to its in-neighbours", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return out


# what each data kind needs, for the wrong-model messages
_NEEDS = {
    "node": "a node-classification model (*_node: gatv2_node, gat_node, transformer_node)",
    "dictlookup": "a DictionaryLookup model (*_dictlookup: gatv2_dictlookup, gat_dictlookup, transformer_dictlookup)",
}
_KIND_WORDS = {
    "node": "a node-classification model (use node data, e.g. data=karate)",
    "dictlookup": "a DictionaryLookup model (use data=dictlookup)",
    "graph": "a graph-classification model (zoo viz graph draws node and DictionaryLookup models)",
}


def _name_kind(name: str) -> Optional[str]:
    """node / dictlookup / graph for a registered graph model name, else the model's task (vision, ...)."""
    import zoo

    if not zoo.is_model(name):
        return None  # zoo.create_model names the unknown model
    entry = zoo.get_model_entry(name)
    if entry.task != "graph":
        return entry.task or "non-graph"
    for kind in ("dictlookup", "node", "graph"):
        if f"_{kind}" in name:
            return kind
    return None


def _instance_kind(model) -> str:
    from zoo.tasks.graph.gat import DictionaryLookupNet, GATGraphClassifier, GATNodeClassifier

    for cls, kind in ((GATNodeClassifier, "node"), (DictionaryLookupNet, "dictlookup"), (GATGraphClassifier, "graph")):
        if isinstance(model, cls):
            return kind
    name = getattr(model, "zoo_model_name", None)
    return (_name_kind(name) if name else None) or type(model).__name__


def _require_kind(kind: Optional[str], want: str, what: str, data: str) -> None:
    if kind is None or kind == want:
        return
    found = _KIND_WORDS.get(kind, f"a {kind} model")
    raise SystemExit(f"zoo viz graph: data={data} needs {_NEEDS[want]}; {what} is {found}")


def _int(opts: dict, key: str, minimum: Optional[int] = None) -> int:
    value = opts[key]
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise SystemExit(f"zoo viz graph: {key} must be an integer{bound}, got {value!r}")
    return number


# where the checkpoint's recorded data config does not say: the defaults of data, seed and k
_DEFAULTS = {"data": "karate", "seed": 0, "k": 10}
# data=dictlookup trains with the seed of `zoo train experiment=graph_dictlookup` (configs/experiment/
# graph_dictlookup.yaml): how many epochs GATv2 needs to leave its first plateau depends on the seed (at seed 0
# it was at 0.47 test accuracy after 5 epochs and 0.73 after 20; at seed 11 at 1.000 after 5)
_DICTLOOKUP_SEED = 11
# the NodeDataModule keys that are not options of the dataset's loader
_NODE_MODULE_KEYS = {"_target_", "name", "root", "seed", "num_features", "num_classes", "model_kind", "num_workers"}


def _parse(argv: Sequence[str]) -> dict:
    opts = {"data": None, "node": "0", "layer": "0", "model": None, "ckpt": None, "epochs": None,
            "seed": None, "out": "graph_attention.png", "heads": None, "k": None, "example": "0", "root": None}
    if any(item in ("-h", "--help", "help") for item in argv):  # as the other zoo viz kinds: usage, exit 0
        print(__doc__)
        raise SystemExit(0)
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"zoo viz graph: arguments are key=value, got {item!r}\n{__doc__}")
        key, value = item.split("=", 1)
        if key not in opts:
            raise SystemExit(f"zoo viz graph: unknown option {key!r}; options: {sorted(opts)}")
        opts[key] = value
    # integers, checked where they enter (each named): seed any, the others bounded
    for key, minimum in (("node", 0), ("layer", 0), ("example", 0)):
        opts[key] = _int(opts, key, minimum)
    for key, minimum in (("seed", None), ("k", 2), ("epochs", 0), ("heads", 1)):
        if opts[key] is not None:
            opts[key] = _int(opts, key, minimum)
    opts["data_options"] = {}
    return opts


# the options that choose and train the model drawn without ckpt= (a checkpoint brings its own model)
_TRAINING_OPTIONS = ("model", "heads", "epochs")


def _refuse_training_options_with_ckpt(opts: dict) -> None:
    """``model=`` / ``heads=`` / ``epochs=`` with ``ckpt=``: the checkpoint's model was drawn and they did nothing,
    without a word (a ckpt of 8 GATv2 heads drawn with 8 panels for ``model=gat_node heads=3``); refused in one line."""
    keys = [key for key in _TRAINING_OPTIONS if opts[key] is not None]
    if not opts["ckpt"] or not keys:
        return
    given = " ".join(f"{key}={opts[key]}" for key in keys)
    named = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + f" and {keys[-1]}"
    apply, choose = ("applies", "it chooses and trains") if len(keys) == 1 else ("apply", "they choose and train")
    raise SystemExit(f"zoo viz graph: {given} {apply} only without ckpt= ({choose} the model drawn); "
                     f"ckpt={opts['ckpt']} fixes the model: leave {named} out, or drop ckpt= to train one")


def _trained_data(model) -> Optional[dict]:
    """The data config a checkpoint was trained with (``zoo train`` records metadata.zoo_config.data)."""
    metadata = getattr(model, "zoo_pretrained_metadata", None) or {}
    config = metadata.get("zoo_config") if isinstance(metadata, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else None


def _trained_data_name(trained: Optional[dict]) -> Optional[str]:
    """The data= value of a recorded graph data config (None for other data: those models are refused)."""
    target = str((trained or {}).get("_target_", ""))
    if target.endswith("DictionaryLookupDataModule"):
        return "dictlookup"
    if target.endswith(".NodeDataModule") and trained.get("name"):
        return str(trained["name"])
    return None


def _adopt_trained_data(opts: dict, model) -> None:
    """Draw on the data the checkpoint was trained on (a Cora model fed karate's 34 features failed with "x has 34
    features, the layer expects 1433"): without ``data=``, its recorded data; with ``data=`` naming that data, the
    recorded values of every key left unset (``data=dictlookup`` drew the default split, seed 11 and fraction 0.8,
    whose "test" graphs were training graphs of a seed-3 run; ``data=sbm`` drew the seed-0 graph for a seed-5 run).
    A given ``k=`` or ``seed=`` that contradicts the record is refused; ``data=`` naming other data adopts nothing
    (the model's kind and width checks name the mismatch)."""
    trained = _trained_data(model)
    name = _trained_data_name(trained)
    if name is None or opts["data"] not in (None, name):
        return
    opts["data"] = name
    if name == "dictlookup":  # its split: generate_permutations / unseen_combinations_split arguments
        recorded_k = trained.get("k")
        if isinstance(recorded_k, int) and not isinstance(recorded_k, bool):
            if opts["k"] is not None and opts["k"] != recorded_k:
                raise SystemExit(f"zoo viz graph: k={opts['k']} contradicts the checkpoint, a model trained on "
                                 f"data.k={recorded_k}: leave k= out (its k is recorded) or pass k={recorded_k}")
            opts["k"] = recorded_k
        opts["data_options"] = {key: trained[key] for key in ("max_examples", "train_fraction", "seed") if key in trained}
        return
    recorded_seed = trained.get("seed")
    if isinstance(recorded_seed, int) and not isinstance(recorded_seed, bool):
        if opts["seed"] is not None and opts["seed"] != recorded_seed:
            raise SystemExit(f"zoo viz graph: seed={opts['seed']} contradicts the checkpoint, trained on data={name} "
                             f"with data.seed={recorded_seed} (the seed draws the graph and its split): leave seed= "
                             f"out to draw on that data")
        opts["seed"] = recorded_seed  # the graph / split seed of networkx / sbm / planetoid data
    if opts["root"] is None and trained.get("root"):
        opts["root"] = _trained_root(model, trained)
    opts["data_options"] = {key: value for key, value in trained.items() if key not in _NODE_MODULE_KEYS}


def _refuse_seed_with_dictlookup_ckpt(opts: dict) -> None:
    """``seed=`` seeds the training of ``data=dictlookup`` without ``ckpt=``; with it nothing is trained and the split
    is the checkpoint's (its recorded data.seed, else the data module's default), so the seed did nothing, without a
    word: refused in one line, as ``model=`` / ``heads=`` / ``epochs=`` are."""
    if not opts["ckpt"] or opts["data"] != "dictlookup" or opts["seed"] is None:
        return
    recorded = opts["data_options"].get("seed")
    split = f"its recorded data.seed={recorded}" if recorded is not None else "the default data.seed"
    raise SystemExit(f"zoo viz graph: seed={opts['seed']} applies to data=dictlookup only without ckpt= (it seeds "
                     f"the training); ckpt={opts['ckpt']} fixes the model and the split ({split}): leave seed out")


def _recorded_root(model, trained: dict) -> Optional[str]:
    """The data root a checkpoint was trained on: NodeDataModule.describe() records it absolute (metadata.data.root);
    older records only hold the config's data.root, as typed."""
    metadata = getattr(model, "zoo_pretrained_metadata", None)
    described = metadata.get("data") if isinstance(metadata, dict) else None
    if isinstance(described, dict) and described.get("root"):
        return str(described["root"])
    return str(trained["root"]) if trained.get("root") else None


def _trained_root(model, trained: dict) -> str:
    """The recorded root (_recorded_root); a relative one (an older record, relative to the directory the run was
    started in) that does not resolve from here is named, instead of "raw file(s) missing" under the wrong folder."""
    root = os.path.expanduser(_recorded_root(model, trained))
    if not os.path.isabs(root) and not os.path.isdir(root):
        raise SystemExit(f"zoo viz graph: the checkpoint records data.root={trained['root']}, a path relative to the "
                         f"directory it was trained in, not found from {os.getcwd()}: pass root=<that folder>")
    return root


def _load_checkpoint(ckpt: str):
    """``ckpt=`` read as ``zoo eval`` and ``zoo predict`` read it (zoo.train.run: resolve_ckpt_argument, then
    _resolve_source): a zoo train run directory as its released/ (else checkpoints/best.ckpt, else last.ckpt, said
    on stderr), a shipped card by name, a ``.ckpt`` of zoo train (its EMA weights when the run kept them, as
    _inference_model loads them for zoo predict), a directory of zoo.save_pretrained (with or without a zoo train
    record: without one the data defaults to karate). Anything else is refused with their messages. A ``.ckpt``'s
    training record (its stored run config and the data module's description) is put on the model as a
    release's config.json puts it (zoo.hub.remember_loaded_metadata), so the picture is drawn on the same data."""
    import zoo
    from omegaconf import OmegaConf

    from zoo.hub import read_config, remember_loaded_metadata
    from zoo.train.run import _inference_model, _resolve_source, resolve_ckpt_argument

    path = _resolve_source(resolve_ckpt_argument(ckpt))
    if path.suffix != ".ckpt" and path.is_dir() and read_config(path) is not None:
        return zoo.from_pretrained(path)
    model, info, cfg = _inference_model(path)  # a .ckpt; anything else fails there, as in zoo eval / zoo predict
    remember_loaded_metadata(model, {"zoo_config": OmegaConf.to_container(cfg, resolve=True), "data": dict(info)})
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    import zoo
    from zoo.tasks.graph.datasets import load_node_dataset

    opts = _parse(sys.argv[1:] if argv is None else argv)
    _refuse_training_options_with_ckpt(opts)
    model = _load_checkpoint(opts["ckpt"]) if opts["ckpt"] else None
    if model is not None:
        _adopt_trained_data(opts, model)
        _refuse_seed_with_dictlookup_ckpt(opts)
        if opts["data"] == "dictlookup" and opts["k"] is None and isinstance(getattr(model, "k", None), int):
            opts["k"] = model.k  # a checkpoint without a data record (zoo.save_pretrained): its model's k
    if opts["seed"] is None and opts["data"] == "dictlookup":
        opts["seed"] = _DICTLOOKUP_SEED
    for key, default in _DEFAULTS.items():
        if opts[key] is None:
            opts[key] = default
    if opts["root"]:  # as PyG's Dataset and the data modules: root=~/data
        opts["root"] = os.path.expanduser(opts["root"])
    torch.manual_seed(opts["seed"])
    if opts["data"] == "dictlookup":
        return _dictlookup(opts, model)
    if opts["ckpt"] is None:
        opts["model"] = opts["model"] or "gatv2_node"
        _require_kind(_name_kind(opts["model"]), "node", f"model={opts['model']}", opts["data"])
    epochs = 100 if opts["epochs"] is None else opts["epochs"]
    source = opts["data"].split(":", 1)[0]
    if source in ("planetoid", "ogb") and not opts["root"]:
        raise SystemExit(f"zoo viz graph: data={opts['data']} is read from local files: pass root=<folder> "
                         + ("(holding <Name>/raw/ind.<name>.*)" if source == "planetoid" else "(holding <ogbn_name>/raw and split)"))
    if model is not None:  # before the data: a checkpoint of another kind is named, not fed node data
        _require_kind(_instance_kind(model), "node", f"ckpt={opts['ckpt']}", opts["data"])
    data = load_node_dataset(opts["data"], opts["root"], seed=opts["seed"], **opts["data_options"])
    node, layer = opts["node"], opts["layer"]
    if not 0 <= node < data["x"].size(0):
        raise SystemExit(f"zoo viz graph: node {node} is out of range for {data['x'].size(0)} nodes")
    if model is not None:
        _check_features(model, data, opts)
    else:
        extra = {} if opts["heads"] is None else {"heads": opts["heads"]}
        model = zoo.create_model(opts["model"], in_channels=data["x"].size(1), num_classes=data["num_classes"], **extra)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3, weight_decay=5e-4)
        model.train()
        for _ in range(epochs):
            loss = F.cross_entropy(model(data["x"], data["edge_index"])[data["train_mask"]], data["y"][data["train_mask"]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits, attn = model(data["x"], data["edge_index"], return_attention_weights=True)
    if not 0 <= layer < len(attn):
        raise SystemExit(f"zoo viz graph: layer {layer} out of range ({len(attn)} attention layers)")
    edge_index, alpha = attn[layer]
    acc = (logits.argmax(-1) == data["y"])[data["test_mask"]].float().mean().item()
    title = f"{data['name']}: node {node}, layer {layer} (test acc {acc:.2f})"
    labels = data["y"]
    if "labelled_mask" in data:  # OGB: y holds 0 for an unlabelled node; drawn as class 0 it would look labelled
        labels = labels.masked_fill(~data["labelled_mask"], -1)
    path = draw_neighbourhood(edge_index, alpha, node, opts["out"], labels=labels, title=title)
    print(f"wrote {path}")
    return 0


def _check_features(model, data: dict, opts: dict) -> None:
    """A checkpoint drawn on data of another width: name the data it was trained on (else the layer's
    "x has 34 features, the layer expects 5")."""
    want = (getattr(model, "zoo_model_args", None) or {}).get("in_channels")
    have = data["x"].size(1)
    if not isinstance(want, int) or want <= 0 or want == have:
        return
    trained = _trained_data(model)
    name = _trained_data_name(trained)
    if name is not None:
        recorded = _recorded_root(model, trained)
        root = f" root={recorded}" if recorded else ""
        hint = f"it was trained on data={name}{root}: leave data= out to draw on that data, or pass it"
    else:
        hint = "pass data= (and root=) of the data it was trained on"
    raise SystemExit(f"zoo viz graph: ckpt={opts['ckpt']} takes {want} node features but data={opts['data']} has "
                     f"{have}; {hint}")


def _dictlookup(opts: dict, model=None) -> int:
    """``zoo viz graph data=dictlookup``: a query node's attention over the key-value nodes of one test graph
    (``model``: the checkpoint's model, when ckpt= is given)."""
    import zoo
    from zoo.tasks.graph.dictlookup import collate, generate_permutations, unseen_combinations_split

    k, example, node = opts["k"], opts["example"], opts["node"]
    if opts["ckpt"] is None:
        opts["model"] = opts["model"] or "gatv2_dictlookup"
        _require_kind(_name_kind(opts["model"]), "dictlookup", f"model={opts['model']}", "dictlookup")
    if opts["layer"] != 0:
        raise SystemExit("zoo viz graph: the DictionaryLookup model has one attention layer: layer=0")
    if not 0 <= node < k:
        raise SystemExit(f"zoo viz graph: node must be a query node, 0..{k - 1} for k={k}; got {node}")
    # the split the checkpoint was trained with (size, fraction, seed) where it recorded them; else the defaults
    recorded = opts["data_options"]
    perms = generate_permutations(k, **{key: recorded[key] for key in ("max_examples", "seed") if key in recorded})
    train_perms, test_perms = unseen_combinations_split(
        perms, **{key: recorded[key] for key in ("train_fraction", "seed") if key in recorded})
    if not 0 <= example < len(test_perms):
        raise SystemExit(f"zoo viz graph: example {example} is out of range for {len(test_perms)} test graphs")
    if model is not None:
        _require_kind(_instance_kind(model), "dictlookup", f"ckpt={opts['ckpt']}", "dictlookup")
        if getattr(model, "k", None) != k:
            raise SystemExit(f"zoo viz graph: the checkpoint is a k={getattr(model, 'k', '?')} model; k={k} does not "
                             "fit it: leave k= out")
    else:
        extra = {} if opts["heads"] is None else {"heads": opts["heads"]}
        model = zoo.create_model(opts["model"], num_classes=k, **extra)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(5 if opts["epochs"] is None else opts["epochs"]):
            # one permutation per epoch, so an epoch is a pass over every training graph, as the data module's
            # sampler does (a fresh randperm per batch drew the batches with replacement: some graphs twice,
            # others never)
            order = train_perms[torch.randperm(len(train_perms))]
            for start in range(0, len(order), 1024):
                batch = collate(order[start:start + 1024])
                loss = F.cross_entropy(model(batch["x"], batch["edge_index"], batch["target_index"]), batch["y"])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
    model.eval()
    with torch.no_grad():
        correct = 0
        for start in range(0, len(test_perms), 1024):
            batch = collate(test_perms[start:start + 1024])
            logits = model(batch["x"], batch["edge_index"], batch["target_index"])
            correct += int((logits.argmax(-1) == batch["y"]).sum())
        graph = collate(test_perms[example:example + 1])
        _, (edge_index, alpha) = model(graph["x"], graph["edge_index"], graph["target_index"],
                                       return_attention_weights=True)
    perm = test_perms[example].tolist()
    names = {q: f"q{q}" for q in range(k)}
    names.update({k + key: f"{key}:{value}" for key, value in enumerate(perm)})
    kind = torch.zeros(2 * k, dtype=torch.long)  # colours: 0 query, 1 key-value, 2 the key the query asks for
    kind[k:] = 1
    kind[k + node] = 2
    accuracy = correct / (len(test_perms) * k)
    title = (f"DictionaryLookup k={k}, {type(model.conv).__name__}: query {node} asks for key {node}\n"
             f"(the answer {node}:{perm[node]} in green); test query accuracy {accuracy:.3f}")
    path = draw_neighbourhood(edge_index, alpha, node, opts["out"], labels=kind, title=title, names=names)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
