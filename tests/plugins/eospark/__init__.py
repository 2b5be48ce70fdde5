"""Tests of the eospark plugin (a package, so its module names cannot clash with other plugins')."""
