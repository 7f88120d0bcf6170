# Shared by the bench/ scripts (sourced, not run).

# train_version MODELS_DIR VERSION SEED: a credit-limit version trained like the shipped v1
# but on another seed, into MODELS_DIR.
train_version() {
  "$BIN" train --data data/taiwan_credit_default.csv --label DID_DEFAULT_PAYMENT \
    --model credit-limit --version "$2" --seed "$3" --schema data/taiwan_schema.toml \
    --exclude USER_ID SEX MARITALSTATUS --created-at 2026-11-28T00:00:00Z \
    --models "$1" > /dev/null
}
