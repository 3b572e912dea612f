-- An imported key (FERRY_ADMIN_KEY, chosen outside Ferry, as short as 16 characters) kept 15
-- of its characters in clear. Now it keeps four, as new imports do. Generated keys (sk-ferry-
-- and 6 of 64 random hex digits) are unchanged. Audit rows written before keep what they
-- recorded (the chain forbids editing them), so such a key is best rotated.
UPDATE api_keys SET display_prefix = substr(display_prefix, 1, 4) WHERE display_prefix NOT LIKE 'sk-ferry-%'
