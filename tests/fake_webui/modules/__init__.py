"""Test fake of A1111 WebUI v1.10.1's ``modules`` package, written from the documented behaviour in
/work/shared/reference/a1111-extension-api.md (not from A1111's source).

Only the module names, public names and signatures LoRA Studio's glue uses are provided, with the smallest bodies
the glue tests need. ``tests/fake_webui`` is put on sys.path by the tests/test_glue_* fixtures only.
"""
