"""The model: what a sandbox and a config are, validated at the edges (pydantic) into plain dataclasses."""
