//! Loader errors: each names the offending node's line and column.

use super::*;

fn err(text: &str) -> String {
    match load_str(text, "p.yaml", &LoadContext::new("/home/dev")) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e.to_string(),
    }
}

/// Checks each `(body, expected Display)`; bodies get an `apiVersion` line
/// prepended, so their first line is line 2.
fn check(cases: &[(&str, &str)]) {
    for (body, expected) in cases {
        assert_eq!(err(&format!("apiVersion: pep/v1\n{body}")), *expected, "{body}");
    }
}

#[test]
fn network_errors() {
    check(&[
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.1/8 }\n",
            r#"p.yaml:4:22: network.rules[0].allow.cidr: bad CIDR `10.0.0.1/8`: host bits are set; did you mean `10.0.0.0/8`?"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.0/8, ports: [70000] }\n",
            r#"p.yaml:4:42: network.rules[0].allow.ports[0]: bad port `70000`: ports are 1-65535"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.0/8, ports: [-1] }\n",
            r#"p.yaml:4:42: network.rules[0].allow.ports[0]: bad port `-1`: ports are 1-65535"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.0/8, ports: [http] }\n",
            r#"p.yaml:4:42: network.rules[0].allow.ports[0]: bad port `http`: expected a number 1-65535"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.0/8, ports: [\"1-70000\"] }\n",
            r#"p.yaml:4:42: network.rules[0].allow.ports[0]: bad port `70000`: ports are 1-65535"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.0/8, ports: [] }\n",
            r#"p.yaml:4:41: network.rules[0].allow.ports: `ports: []` matches nothing; leave `ports` out to match every port"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.0/8, ports: [1.5] }\n",
            r#"p.yaml:4:42: network.rules[0].allow.ports[0]: invalid type: floating point `1.5`, expected a port (`443`) or a port range (`"9000-9100"`)"#,
        ),
        (
            "network:\n  rules:\n    - allow: { ports: [1] }\n",
            r#"p.yaml:4:14: network.rules[0].allow: a network rule needs `cidr` or `domain`"#,
        ),
        (
            "network:\n  rules:\n    - allow: { domain: 'api.*.com' }\n",
            r#"p.yaml:4:24: network.rules[0].allow.domain: domain pattern `api.*.com` cannot be enforced as written: only a leading `*.` wildcard is supported (e.g. `*.example.com`)"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: '${meta}/32' }\n",
            r#"p.yaml:4:22: network.rules[0].allow.cidr: unknown variable `${meta}`: define it under `vars:`"#,
        ),
        (
            "network:\n  rules:\n    - permit: { cidr: 10.0.0.0/8 }\n",
            r#"p.yaml:4:7: network.rules[0]: unknown field `permit`, expected `allow` or `deny`"#,
        ),
        (
            "network:\n  rules:\n    - allow: { cidr: 10.0.0.0/8 }\n      allow: { cidr: 10.0.0.0/8 }\n",
            r#"p.yaml:5:7: network.rules[0]: duplicate `allow`"#,
        ),
        (
            "network:\n\trules: []\n",
            r#"p.yaml:3:1: found character that cannot start any token, while scanning for the next token"#,
        ),
    ]);
}

#[test]
fn files_and_exec_errors() {
    check(&[
        (
            "files:\n  rules:\n    - deny:\n        path: /etc/shadow\n        acess: [read]\n",
            r#"p.yaml:6:9: files.rules[0].deny: unknown field `acess`, expected one of `path`, `name`, `access`"#,
        ),
        (
            "files:\n  rules:\n    - deny: { path: /etc, name: x }\n",
            r#"p.yaml:4:13: files.rules[0].deny: a file rule has either `path` or `name`, not both; write two rules"#,
        ),
        (
            "files:\n  rules:\n    - deny: { access: [read] }\n",
            r#"p.yaml:4:13: files.rules[0].deny: a file rule needs `path` or `name`"#,
        ),
        (
            "files:\n  rules:\n    - deny: { path: /etc, access: [] }\n",
            r#"p.yaml:4:13: files.rules[0].deny: `access: []` matches nothing; leave `access` out for read and write"#,
        ),
        (
            "files:\n  rules:\n    - deny: { path: /etc, access: [exec] }\n",
            r#"p.yaml:4:36: files.rules[0].deny.access[0]: unknown variant `exec`, expected `read` or `write`"#,
        ),
        (
            "files:\n  rules:\n    - deny: { name: a/b }\n",
            r#"p.yaml:4:21: files.rules[0].deny.name: `name: a/b` must be a plain file name without `/`; use `path:` for paths"#,
        ),
        (
            "files:\n  rules:\n    - deny: { name: '*.pem' }\n",
            r#"p.yaml:4:21: files.rules[0].deny.name: name pattern `*.pem` cannot be enforced as written: the kernel matches whole file names only"#,
        ),
        (
            "files:\n  rules:\n    - deny: { path: /a/../b }\n",
            r#"p.yaml:4:21: files.rules[0].deny.path: path `/a/../b` contains `..`: write the path it resolves to (paths are matched after the kernel resolves them)"#,
        ),
        (
            "files:\n  rules:\n    - deny: { path: relative/x }\n",
            r#"p.yaml:4:21: files.rules[0].deny.path: path `relative/x` must be absolute (start with `/`, `~/` or a `${var}` holding an absolute path)"#,
        ),
        (
            "files:\n  default: ask\n",
            r#"p.yaml:3:12: files.default: unknown variant `ask`, expected `allow` or `deny`"#,
        ),
        (
            "exec:\n  rules:\n    - deny: { path: '/usr/bin/*' }\n",
            r#"p.yaml:4:21: exec.rules[0].deny.path: path pattern `/usr/bin/*` cannot be enforced as written: the kernel matches exact paths (`/a/b`) and directory prefixes (`/a/b/**`) only"#,
        ),
        (
            "exec:\n  rules:\n    - deny: { name: nc }\n",
            r#"p.yaml:4:15: exec.rules[0].deny: unknown field `name`, expected `path`"#,
        ),
    ]);
}

#[test]
fn pdp_errors() {
    check(&[
        (
            "pdp:\n  engine: wasm\n",
            r#"p.yaml:3:11: pdp.engine: unknown variant `wasm`, expected one of `builtin`, `rego`, `opa`"#,
        ),
        (
            "pdp:\n  engine: rego\n",
            r#"p.yaml:3:3: pdp: `engine: rego` needs `rego: { files: [...] }`"#,
        ),
        (
            "pdp:\n  opa: { url: 'ftp://x' }\n",
            r#"p.yaml:3:15: pdp.opa.url: bad OPA URL `ftp://x`: expected `http://host:port/v1/data/...` or https"#,
        ),
        (
            "pdp:\n  opa: { url: 'http://x', timeout_ms: 0 }\n",
            r#"p.yaml:3:8: pdp.opa: `timeout_ms: 0` would fail every query; give a positive timeout"#,
        ),
        (
            "pdp:\n  opa: { url: 'http://x', timeout: 5 }\n",
            r#"p.yaml:3:27: pdp.opa: unknown field `timeout`, expected `url` or `timeout_ms`"#,
        ),
        (
            "pdp:\n  on_unavailable: retry\n",
            r#"p.yaml:3:19: pdp.on_unavailable: unknown variant `retry`, expected one of `deny`, `allow`, `stale`"#,
        ),
        (
            "pdp:\n  rego: { files: [a.rego], query: 'pep.decision' }\n",
            r#"p.yaml:3:35: pdp.rego.query: bad Rego query `pep.decision`: expected `data.<package>.<rule>` such as `data.pep.decision`"#,
        ),
        (
            "pdp:\n  busy_poll_us: 2000000\n",
            r#"p.yaml:3:3: pdp: `busy_poll_us: 2000000` is more than 1000000 (a second of spinning after each miss)"#,
        ),
        (
            "pdp:\n  busy_poll_us: -5\n",
            r#"p.yaml:3:17: pdp.busy_poll_us: invalid type: integer `-5`, expected u64"#,
        ),
    ]);
}

#[test]
fn top_level_errors() {
    check(&[
        (
            "mode: permissive\n",
            r#"p.yaml:2:7: mode: unknown variant `permissive`, expected `enforce` or `audit`"#,
        ),
        (
            "name: a/b\n",
            r#"p.yaml:2:7: name: bad name `a/b`: use up to 64 letters, digits, `-`, `_` and `.`, starting with a letter or digit"#,
        ),
        (
            "network: {}\nnetwork: {}\n",
            r#"p.yaml:1:1: duplicate field `network`"#,
        ),
        (
            "vars: { 1x: a }\n",
            r#"p.yaml:2:9: vars: bad variable name `1x`: use letters, digits, `_` and `-`, starting with a letter or `_`"#,
        ),
    ]);
}

#[test]
fn whole_file_errors() {
    assert_eq!(err(""), r#"p.yaml: the policy is empty"#);
    assert_eq!(
        err("apiVersion: pep/v2\n"),
        r#"p.yaml:1:13: apiVersion: unsupported apiVersion `pep/v2`: this pep-agent reads `pep/v1`"#
    );
    assert_eq!(
        err("[]"),
        r#"p.yaml:1:1: invalid type: sequence, expected a policy: a mapping starting with `apiVersion: pep/v1`"#
    );
    assert_eq!(
        err("apiVersion: pep/v1\n---\napiVersion: pep/v1\n"),
        r#"p.yaml: deserializing from YAML containing more than one document is not supported"#
    );
}
