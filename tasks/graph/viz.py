"""Graph attention pictures (``zoo viz graph``): a node's neighbourhood with edge widths proportional to
the attention it pays to each neighbour, one panel per head.

The weights come from the layers' ``return_attention_weights`` (PyG protocol: (edge_index with the
self loops that were added, alpha [E', H])); the picture shows the incoming edges j -> i of the chosen
node i (its self loop as a ring), their alpha as width and label, plus the 2-hop context in grey.

    zoo viz graph [data=karate] [node=0] [layer=0] [model=gatv2_node] [ckpt=<dir from zoo.save_pretrained>]
                  [epochs=100] [seed=0] [out=graph_attention.png]

Without ``ckpt`` the model is trained full-batch for ``epochs`` steps first (Adam 5e-3, the GAT recipe)
so the picture shows learned attention. Letters: N nodes, E edges, H heads.
"""
from __future__ import annotations

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
                       labels: Optional[torch.Tensor] = None, title: str = "") -> str:
    """Write a PNG: one panel per head, edge width ~ attention of ``node`` to each in-neighbour."""
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
        colours = [cmap(int(labels[v]) % 10) for v in G.nodes()]
    for h in range(heads):
        ax = axes[0, h]
        nx.draw_networkx_edges(G, pos, ax=ax, edge_color="#cccccc", width=0.6, arrows=False)
        widths, edges, loop = [], [], 0.0
        for s, w in zip(src.tolist(), a[:, h].tolist()):
            if s == node:
                loop += w
            else:
                edges.append((s, node))
                widths.append(w)
        nx.draw_networkx_edges(G, pos, edgelist=edges, ax=ax, width=[0.5 + 10 * w for w in widths],
                               edge_color="tab:red", arrows=True, arrowsize=8)
        nx.draw_networkx_nodes(G, pos, ax=ax, node_size=[420 if v == node else 160 for v in G.nodes()],
                               node_color=colours or "tab:blue", edgecolors="black")
        nx.draw_networkx_labels(G, pos, ax=ax, font_size=7)
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


def _parse(argv: Sequence[str]) -> dict:
    opts = {"data": "karate", "node": "0", "layer": "0", "model": "gatv2_node", "ckpt": None, "epochs": "100",
            "seed": "0", "out": "graph_attention.png", "heads": None}
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"zoo viz graph: arguments are key=value, got {item!r}\n{__doc__}")
        key, value = item.split("=", 1)
        if key not in opts:
            raise SystemExit(f"zoo viz graph: unknown option {key!r}; options: {sorted(opts)}")
        opts[key] = value
    return opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    import zoo
    from zoo.tasks.graph.datasets import load_node_dataset

    opts = _parse(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(int(opts["seed"]))
    data = load_node_dataset(opts["data"], seed=int(opts["seed"]))
    node, layer = int(opts["node"]), int(opts["layer"])
    if not 0 <= node < data["x"].size(0):
        raise SystemExit(f"zoo viz graph: node {node} is out of range for {data['x'].size(0)} nodes")
    if opts["ckpt"]:
        model = zoo.from_pretrained(opts["ckpt"])
    else:
        extra = {} if opts["heads"] is None else {"heads": int(opts["heads"])}
        model = zoo.create_model(opts["model"], in_channels=data["x"].size(1), num_classes=data["num_classes"], **extra)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3, weight_decay=5e-4)
        model.train()
        for _ in range(int(opts["epochs"])):
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
    path = draw_neighbourhood(edge_index, alpha, node, opts["out"], labels=data["y"], title=title)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
