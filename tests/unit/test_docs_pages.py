"""The generated docs pages (scripts/docs_pages.py): a page per registered objective, in the site's
navigation, listing exactly the options of its class signature (each variant's for a family)
with their defaults."""

from __future__ import annotations

import inspect
import re

import docs_pages
import yaml
from helpers import REPO

from m3i_lightning.objectives import OBJECTIVES

OPTIONS_HEADER = "| option | default | declared by |"


def signature_options(cls: type) -> dict[str, object]:
    """Keyword options of ``cls``, read here from the constructors: each ``__init__`` up the
    class chain while the one below passes ``**kwargs`` on; the most derived default wins."""
    options: dict[str, object] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        for name, parameter in parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD,
                                                         parameter.VAR_POSITIONAL):
                options.setdefault(name, parameter.default)
        if all(p.kind is not p.VAR_KEYWORD for p in parameters.values()):
            return options
    raise AssertionError(f"{cls.__name__}: the constructor chain never ends")


def page_tables(page: str) -> list[dict[str, str]]:
    """Each options table of a page as option → shown default, in page order."""
    tables, current = [], None
    for line in page.splitlines():
        if line == OPTIONS_HEADER:
            current = {}
            tables.append(current)
        elif current is not None and line.startswith("| `"):
            option, default, _ = (cell.strip() for cell in line.strip("|").split("|"))
            current[option.strip("`")] = default
        elif current is not None and not line.startswith("|---"):
            current = None
    return tables


def test_each_objective_page_lists_exactly_its_signature_options():
    pages = docs_pages.pages()
    assert set(pages) == {"objectives/index.md", *(f"objectives/{n}.md" for n in OBJECTIVES)}
    for name, cls in OBJECTIVES.items():
        page = pages[f"objectives/{name}.md"]
        classes = list(cls.variants.values()) if "variants" in vars(cls) else [cls]
        tables = page_tables(page)
        assert len(tables) == len(classes), name
        for member, table in zip(classes, tables, strict=True):
            expected = signature_options(member)
            assert list(table) == list(expected), member  # the same options, in the same order
            for option, default in expected.items():
                if option in docs_pages.FROM_BACKBONE:
                    assert table[option] == "the backbone's"
                elif default is inspect.Parameter.empty:
                    assert table[option] == "required", (member, option)
                else:
                    assert table[option] == f"`{default!r}`", (member, option)
        assert f"::: {cls.__module__}.{cls.__qualname__}" in page
        assert f"[`{name}`]({name}.md)" in pages["objectives/index.md"]


def test_a_renamed_option_changes_the_page(monkeypatch):
    """The page is read from the signature at build time: rename a parameter of AutoEncoder
    and both pages built on it (ae, and mim_pixel, its subclass) follow."""
    autoencoder = OBJECTIVES["ae"]
    original = autoencoder.__init__

    def renamed(self, norm_pixels: bool | None = None, **kwargs):
        original(self, norm_pix=norm_pixels, **kwargs)

    monkeypatch.setattr(autoencoder, "__init__", renamed)
    for name in ("ae", "mim_pixel"):
        (table,) = page_tables(docs_pages.objective_page(name))
        assert list(table)[:2] == ["norm_pixels", "weight"], name


def test_every_generated_page_is_in_the_site_navigation():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = set(re.findall(r"objectives/\w+\.md", str(config["nav"])))
    assert listed == set(docs_pages.pages())
    assert "scripts/docs_pages.py" in config["hooks"]
