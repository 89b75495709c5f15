# Sourced by the engine scripts' `ci` modes. `last_commit_touches PATH...` prints what the last
# commit changed among PATHs (at most 5 lines, "first commit" without a parent) and succeeds
# when that is not empty: the checks of an engine that is not cached run only then.
last_commit_touches() {
    local base changed
    base=$(git rev-parse -q --verify HEAD~1 || true)
    if [ -z "$base" ]; then
        echo "first commit"
        return 0
    fi
    changed=$(git diff --name-only "$base" HEAD -- "$@" | head -5)
    [ -n "$changed" ] && echo "$changed"
}
