"""CLIP space: CompAlign maps, text banks, scoring (to come)."""
