"""Speaking to the service: ``client`` sends requests and maps every failure to one error tree, ``wire``
reads its answers into typed views, ``pacing`` keeps an account's submit rate and concurrency, ``quotas``
reads what an account was granted.
"""
