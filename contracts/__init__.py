"""Contracts every plane may import: config models, data-root layout, record schemas, credentials.

Nothing in here imports a plane; the planes import this.
"""
