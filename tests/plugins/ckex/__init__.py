"""Tests of the ckex plugin (a package, so module names do not clash with other plugins')."""
