"""panda_core: the ground every part of panda-wms imports (standard library only)."""
