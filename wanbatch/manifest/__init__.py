"""The manifest: a YAML file read, checked and expanded into the items of a batch.

``yamlsrc`` reads YAML keeping every node's line; ``parse`` turns the document into a plan of entries
(``layers`` for matrix/zip/vars/params, ``values`` for one value, ``files`` for prompt files, ``checks``
for what the catalog allows); ``expand`` and ``survey`` make the items; ``naming`` names their files;
``plan`` prices them. ``load`` is the front door: ``Manifest.load(path)``.
"""

from wanbatch.manifest.load import DEFAULT_OUTPUT, Item, Manifest, draw_seed, item_id

__all__ = ["DEFAULT_OUTPUT", "Item", "Manifest", "draw_seed", "item_id"]
