"""The pipeline's stages, in the order an item meets them: ``intake`` (the manifest's items into the ledger,
once per manifest), ``submit`` (which item, through which lane, when) and ``send`` (a create, paid for once),
``track`` (polls tasks to their end), ``reconcile`` (settles creates whose answer was lost),
``results`` (what a finished task leaves), ``download`` (saves every image before its URL dies);
``lane`` is what these share for one (account, model), ``pool`` which accounts a run has and its lanes,
``reader`` the one reader of planned rows per (region, model) that picks each item's lane; ``claims`` holds
an item's place among the lane's open tasks and its price in the ``budget`` (the spending limit) while its
create may cost; ``cancel`` stops tasks on the service. ``startup`` is what a run settles in the ledger before
its stages start, ``assembly`` the stages built over the lanes and run in order.
"""
