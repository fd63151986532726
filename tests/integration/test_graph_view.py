"""The HTML view of an attribution graph (#35) in headless Chromium: every node in its step's column and its
layer's row, clicking a node lists its details and strongest links, the threshold hides exactly the weak
links, and token text (`</script>` included) stays text. Graphs: one attributed on a random tiny model with
random transcoders (as tests/unit/test_attribution_graphs.py builds it) and one built by hand."""

from __future__ import annotations

import json
import re

import pytest
import torch
from random_models import CFG, random_model

from diffusionlens.graphs.attribution import attribute_trajectory
from diffusionlens.graphs.graph import Graph
from diffusionlens.graphs.trajectory import record_trajectory
from diffusionlens.graphs.transcoders import random_transcoders
from diffusionlens.sampling import ReplayNoise
from diffusionlens.viz.graph_view import TOP_LINKS, graph_view_data, render_graph_view, write_graph_view

PROMPT = torch.tensor([[2, 5, 7, 9, 11, 3, 4]])
OPTIONS = dict(max_new_tokens=CFG.canvas_length, max_denoising_steps=4, entropy_bound=0.0)
TARGET = dict(position=2, step=3, token=(4, 7))

# token texts that would run script or add elements if they reached the page as markup
HOSTILE = {
    0: "</script><script>window.__xss = 1</script>",
    1: '<img src=x onerror="window.__xss = 2">',
    2: "<!--",
    3: "a &amp; b",
    4: "plain",
}
HOSTILE_TITLE = "</title><script>window.__xss = 3</script>"


@pytest.fixture(scope="module")
def graph() -> Graph:
    model = random_model(torch.float32)
    transcoders = random_transcoders(model, 16, seed=1)
    trajectory = record_trajectory(model, PROMPT, noise=ReplayNoise(0), **OPTIONS)
    return attribute_trajectory(model, transcoders, trajectory, TARGET, max_feature_nodes=24)


def hand_graph() -> Graph:
    """Two steps, two layers, canvas of two: a feature and an error at step 0, a feature at step 1, the
    canvas tokens of both steps, two prompt tokens and the target logit (token ids index HOSTILE)."""
    kind = ["feature", "feature", "error", "token", "token", "token", "token", "prompt", "prompt", "logit"]
    step = [0, 1, 0, 0, 0, 1, 1, -1, -1, 1]
    layer = [0, 1, 1, -1, -1, -1, -1, -1, -1, -1]
    position = [0, 1, 1, 0, 1, 0, 1, 0, 1, 1]
    feature = [5, 7, -1, -1, -1, -1, -1, -1, -1, -1]
    token = [-1, -1, -1, 0, 1, 2, 3, 4, 0, 3]
    nan = float("nan")
    activation = [1.5, 0.25, nan, nan, nan, nan, nan, nan, nan, nan]
    # (target, source, weight): within step 0, across steps 0 -> 1, from the prompt, into the logit
    edges = [(0, 3, 0.5), (0, 7, -0.2), (2, 0, 0.1), (1, 0, 0.9), (1, 2, -0.4), (1, 5, 0.05), (1, 8, 0.3)]
    edges += [(9, 1, 2.0), (9, 6, -1.0), (9, 2, 0.6)]
    targets, sources, weights = zip(*edges, strict=True)
    adjacency = torch.sparse_coo_tensor(
        torch.tensor([targets, sources]), torch.tensor(weights), (10, 10), check_invariants=True
    )
    metadata = {
        "target": {"step": 1, "position": 1, "tokens": [[3, 1]]},
        "prompt_length": 2,
        "canvas_length": 2,
        "n_layers": 2,
        "n_steps": 2,
        "canvas": 0,
        "prompt": "<b>hand</b>",
    }
    longs = (torch.tensor(x) for x in (step, layer, position, feature, token))
    return Graph(
        kind, *longs, torch.tensor(activation), torch.zeros(10), torch.zeros(10), adjacency.coalesce(), metadata
    )


def hostile_decode(token: int) -> str:
    return HOSTILE[token]


def page_nodes(driver) -> list[dict]:
    """Each drawn node's data attributes and its centre on screen."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.node')).map(e => { const r = e.getBoundingClientRect();"
        " return {node: Number(e.dataset.node), kind: e.dataset.kind, step: Number(e.dataset.step),"
        " layer: Number(e.dataset.layer), position: Number(e.dataset.position),"
        " x: r.left + r.width / 2, y: r.top + r.height / 2}; })"
    )


def column_spans(driver) -> dict[str, tuple[float, float]]:
    return driver.execute_script(
        "const out = {}; document.querySelectorAll('.column').forEach(c => {"
        " const r = c.querySelector('.column-band').getBoundingClientRect(); out[c.dataset.step] = [r.left, r.right];"
        " }); return out;"
    )


def row_spans(driver) -> dict[str, float]:
    return driver.execute_script(
        "const out = {}; document.querySelectorAll('.row-label').forEach(e => {"
        " const r = e.getBoundingClientRect(); out[e.dataset.layer] = r.top + r.height / 2; }); return out;"
    )


def click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.CSS_SELECTOR, selector)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", element)
    element.click()


def set_threshold(driver, value: float) -> None:
    element = driver.find_element("id", "threshold")
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", element, str(value)
    )


def visible_links(driver) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.link')).filter(e => getComputedStyle(e).display !== 'none')"
        ".map(e => Number(e.dataset.link))"
    )


# --------------------------------------------------------------------------- without a browser


def test_page_is_self_contained_and_its_data_is_the_graph_file(graph, tmp_path):
    page = render_graph_view(graph)
    assert re.search(r"\b(src|href)\s*=", page) is None and "https://" not in page
    assert page.count("<script") == 2 and "default-src 'none'" in page
    document = json.loads(graph.to_json(tmp_path / "g.json").read_text())
    from_file, from_graph = graph_view_data(tmp_path / "g.json"), graph_view_data(graph)
    assert from_file == from_graph
    assert [node["id"] for node in from_graph["nodes"]] == [node["node_id"] for node in document["nodes"]]
    assert len(from_graph["links"]) == len(document["links"])
    assert {node["step"] for node in from_graph["nodes"] if node["kind"] == "token"} == {0, 1, 2, 3}
    assert from_graph["n_steps"] == 4 and from_graph["n_layers"] == CFG.num_hidden_layers


def test_embedded_json_cannot_close_the_script():
    page = render_graph_view(hand_graph(), hostile_decode, title=HOSTILE_TITLE, node_threshold=None)
    for text in (*HOSTILE.values(), HOSTILE_TITLE, "<b>hand</b>"):
        if "<" in text:
            assert text not in page
    body = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, flags=re.S).group(1)
    assert "<" not in body and ">" not in body and "&" not in body
    data = json.loads(body)
    assert data["title"] == HOSTILE_TITLE and data["prompt"] == "<b>hand</b>"
    assert [node["text"] for node in data["nodes"] if node["kind"] == "token"] == [HOSTILE[t] for t in (0, 1, 2, 3)]
    assert data["target"] == f"logit({HOSTILE[3]})"


def test_bad_documents_are_refused_naming_the_fix(tmp_path):
    document = hand_graph().json_document(node_threshold=None)
    for node in document["nodes"]:
        del node["step"]
    with pytest.raises(ValueError, match="circuit-tracer's own files have no steps. Write it with Graph.to_json"):
        graph_view_data(document)
    document = hand_graph().json_document(node_threshold=None)
    document["links"].append({"source": "nowhere", "target": document["nodes"][0]["node_id"], "weight": 1.0})
    with pytest.raises(ValueError, match="names a node the document does not have"):
        graph_view_data(document)
    with pytest.raises(ValueError, match="needs `nodes` and `links`"):
        graph_view_data({"nodes": []})
    with pytest.raises(TypeError, match="a Graph, a graph document"):
        graph_view_data(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- in a browser


def test_nodes_sit_in_their_step_columns_and_layer_rows(graph, driver, open_page, tmp_path):
    data = graph_view_data(graph)
    open_page(write_graph_view(graph, tmp_path / "graph.html"))
    drawn = page_nodes(driver)
    assert [n["node"] for n in drawn] == list(range(len(data["nodes"])))
    columns, rows = column_spans(driver), row_spans(driver)
    assert list(columns) == ["-1", "0", "1", "2", "3", "target"]
    lefts = [columns[key][0] for key in columns]
    assert lefts == sorted(lefts)  # prompt, step 0, 1, 2, 3, target: left to right
    # rows bottom to top: tokens (E), layer 0, 1, 2, the logit
    heights = [rows[str(layer)] for layer in range(-1, CFG.num_hidden_layers + 1)]
    assert heights == sorted(heights, reverse=True)
    for shown, node in zip(drawn, data["nodes"], strict=True):
        assert (shown["kind"], shown["step"], shown["layer"]) == (node["kind"], node["step"], node["layer"])
        key = "target" if node["kind"] == "logit" else str(node["step"])
        left, right = columns[key]
        assert left <= shown["x"] <= right, (node, key)
        row_height = abs(rows["0"] - rows["1"])
        assert abs(shown["y"] - rows[str(node["layer"])]) < row_height / 2, node
    # within a step and a layer, positions run left to right
    tokens = sorted((n for n in drawn if n["kind"] == "token" and n["step"] == 1), key=lambda n: n["position"])
    assert [n["position"] for n in tokens] == list(range(CFG.canvas_length))
    assert [n["x"] for n in tokens] == sorted(n["x"] for n in tokens)
    assert len({n["x"] for n in tokens}) == CFG.canvas_length
    assert driver.execute_script("return document.querySelectorAll('.link').length") == len(data["links"])


def test_clicking_a_node_shows_its_details_and_strongest_links(graph, driver, open_page, tmp_path):
    data = graph_view_data(graph)
    open_page(write_graph_view(graph, tmp_path / "graph.html"))
    links = data["links"]
    # the feature with the most links, so the lists are cut to TOP_LINKS
    features = [i for i, node in enumerate(data["nodes"]) if node["kind"] == "feature"]
    index = max(features, key=lambda i: sum(i in (s, t) for s, t, _ in links))
    node = data["nodes"][index]
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    shape = driver.find_element(By.CSS_SELECTOR, f'.node[data-node="{index}"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", shape)
    ActionChains(driver).move_to_element(shape).perform()
    tip = driver.execute_script(
        "return Array.from(document.querySelectorAll('#tooltip .tip-line')).map(e => e.textContent)"
    )
    at = f"@ step {node['step']} pos {node['position']}"
    assert tip[:2] == [f"feature {node['feature']} L{node['layer']} {at}", f"activation {node['activation']:.4f}"]
    click(driver, f'.node[data-node="{index}"]')
    assert driver.execute_script("return document.getElementById('details').dataset.node") == str(index)
    fields = driver.execute_script(
        "const out = {}; document.querySelectorAll('#details .detail-line').forEach(e => {"
        " out[e.dataset.field] = e.textContent; }); return out;"
    )
    assert fields["kind"] == "kind: feature"
    assert fields["step"] == f"step: {node['step']}" and fields["layer"] == f"layer: {node['layer']}"
    assert fields["position"] == f"position: {node['position']} (canvas)"
    assert fields["feature"] == f"feature: {node['feature']}"
    assert fields["activation"] == f"activation: {node['activation']:.6f}"

    def listed(direction: str) -> list[tuple[int, float]]:
        return [
            (int(n), float(w))
            for n, w in driver.execute_script(
                f"return Array.from(document.querySelectorAll('#details [data-direction={direction}] .link-row'))"
                ".map(e => [e.dataset.node, e.dataset.weight])"
            )
        ]

    incoming = sorted(((s, w) for s, t, w in links if t == index), key=lambda sw: -abs(sw[1]))[:TOP_LINKS]
    outgoing = sorted(((t, w) for s, t, w in links if s == index), key=lambda tw: -abs(tw[1]))[:TOP_LINKS]
    assert incoming and outgoing
    assert listed("incoming") == [(n, pytest.approx(w)) for n, w in incoming]
    assert listed("outgoing") == [(n, pytest.approx(w)) for n, w in outgoing]
    assert driver.execute_script("return document.querySelectorAll('.node.selected').length") == 1
    active = driver.execute_script("return document.querySelectorAll('.link.active').length")
    assert active == sum(index in (s, t) for s, t, _ in links)
    # a listed link selects the node at its other end
    other = incoming[0][0]
    click(driver, f'#details [data-direction=incoming] .link-row[data-node="{other}"]')
    assert driver.execute_script("return document.getElementById('details').dataset.node") == str(other)


def test_threshold_hides_exactly_the_weak_links(graph, driver, open_page, tmp_path):
    data = graph_view_data(graph)
    weights = [abs(w) for _, _, w in data["links"]]
    open_page(write_graph_view(graph, tmp_path / "graph.html"))
    assert sorted(visible_links(driver)) == list(range(len(weights)))
    for fraction in (0.05, 0.3, 1.0):
        set_threshold(driver, fraction)
        strong = [j for j, w in enumerate(weights) if w >= fraction * max(weights)]
        assert len(strong) < len(weights)
        assert sorted(visible_links(driver)) == strong
        assert driver.execute_script("return document.getElementById('link-count').dataset.shown") == str(len(strong))
    set_threshold(driver, 0)
    assert len(visible_links(driver)) == len(weights)


def test_token_text_is_displayed_not_executed(driver, open_page, tmp_path):
    from selenium.webdriver.common.by import By

    path = write_graph_view(hand_graph(), tmp_path / "hostile.html", hostile_decode, title=HOSTILE_TITLE,
                            node_threshold=None)  # fmt: skip
    open_page(path)

    def assert_inert():
        assert driver.execute_script("return window.__xss === undefined")
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 2
        assert driver.find_elements(By.CSS_SELECTOR, "img, b, #graph script, #details script") == []

    assert_inert()
    assert driver.title == HOSTILE_TITLE
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll('.token-label')).map(e => e.textContent)"
    )
    assert "<!--" in labels and "plain" in labels
    click(driver, '.node[data-kind="token"][data-step="0"][data-position="0"]')
    fields = driver.execute_script(
        "return Array.from(document.querySelectorAll('#details .detail-line')).map(e => e.textContent)"
    )
    assert f"token: {json.dumps(HOSTILE[0])} (id 0)" in fields
    assert driver.execute_script("return document.querySelector('#details h2').textContent").startswith(
        "canvas token " + json.dumps(HOSTILE[0])
    )
    assert_inert()
    # the hand graph's layout: prompt, step 0, step 1, target; the cross-step link from step 0's feature
    drawn = {n["node"]: n for n in page_nodes(driver)}
    columns = column_spans(driver)
    assert columns["0"][1] < drawn[1]["x"] < columns["target"][0]  # step 1's feature right of step 0
    assert drawn[0]["x"] < columns["0"][1] and drawn[9]["x"] > columns["1"][1]
