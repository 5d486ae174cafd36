"""The pipeline's stages, in the order an item meets them: ``submit`` (a create, paid for once),
``track`` (polls tasks to their end), ``reconcile`` (settles creates whose answer was lost),
``results`` (what a finished task leaves), ``download`` (saves every image before its URL dies);
``budget`` keeps the spending limit and ``cancel`` stops tasks on the service.
"""
