//! Loader tests: the SPEC example, defaults, expansion.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use super::*;

const SPEC_EXAMPLE: &str = include_str!("../../tests/fixtures/spec-example.yaml");

fn ctx() -> LoadContext {
    LoadContext::new("/home/dev")
}

fn load(text: &str) -> Policy {
    load_str(text, "p.yaml", &ctx()).unwrap_or_else(|e| panic!("{e}"))
}

fn path(p: &str, prefix: bool) -> PathPattern {
    PathPattern {
        path: p.into(),
        prefix,
    }
}

#[test]
fn spec_example_parses() {
    let p = load(SPEC_EXAMPLE);
    assert_eq!(p.name.as_deref(), Some("coding-agent"));
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.vars.get("workspace"), Some("/home/dev/project"));

    assert_eq!(p.network.default, NetDefault::Deny);
    let net = &p.network.rules;
    assert_eq!(net.len(), 3);
    assert_eq!(net[0].index, 0);
    assert_eq!(net[0].verdict, Verdict::Allow);
    assert_eq!(net[0].target, NetTarget::Cidr("127.0.0.0/8".parse().unwrap()));
    assert_eq!(
        net[0].ports,
        [PortRange { lo: 8080, hi: 8080 }, PortRange { lo: 9000, hi: 9100 }]
    );
    assert_eq!(net[0].protocol, Some(Protocol::Tcp));
    assert_eq!(net[1].verdict, Verdict::Deny);
    assert_eq!(
        net[1].target,
        NetTarget::Cidr("169.254.169.254/32".parse().unwrap())
    );
    assert!(net[1].ports.is_empty());
    assert_eq!(net[1].protocol, None);
    assert_eq!(net[1].name(), "network.rules[1]");
    assert_eq!(
        net[2].target,
        NetTarget::Domain(DomainPattern::parse("*.github.com").unwrap())
    );
    assert_eq!(net[2].ports, [PortRange { lo: 443, hi: 443 }]);

    assert_eq!(p.files.default, Verdict::Deny);
    let files: Vec<_> = p
        .files
        .rules
        .iter()
        .map(|r| (r.index, r.verdict, r.target.clone(), r.access))
        .collect();
    let rw = Access::ALL;
    let r = Access {
        read: true,
        write: false,
    };
    let w = Access {
        read: false,
        write: true,
    };
    assert_eq!(
        files,
        [
            (0, Verdict::Allow, FileTarget::Path(path("/usr", true)), r),
            (
                1,
                Verdict::Allow,
                FileTarget::Path(path("/home/dev/project", true)),
                rw
            ),
            (
                2,
                Verdict::Deny,
                FileTarget::Path(path("/home/dev/project/.git/hooks", true)),
                w
            ),
            (
                3,
                Verdict::Deny,
                FileTarget::Path(path("/home/dev/.ssh", true)),
                rw
            ),
            (4, Verdict::Deny, FileTarget::Name(FileName(".env".into())), rw),
        ]
    );
    assert_eq!(p.files.rules[4].name(), "files.rules[4]");

    assert_eq!(p.exec.default, Verdict::Allow);
    assert_eq!(p.exec.rules.len(), 1);
    assert_eq!(p.exec.rules[0].verdict, Verdict::Deny);
    assert_eq!(p.exec.rules[0].path, path("/usr/bin/nc", false));
    assert_eq!(p.exec.rules[0].name(), "exec.rules[0]");

    assert_eq!(p.pdp.engine, Engine::Builtin);
    let rego = p.pdp.rego.as_ref().unwrap();
    assert_eq!(rego.files, [PathBuf::from("policy.rego")]);
    assert_eq!(rego.query, "data.pep.decision");
    let opa = p.pdp.opa.as_ref().unwrap();
    assert_eq!(opa.url, "http://127.0.0.1:8181/v1/data/pep/decision");
    assert_eq!(opa.timeout_ms, 200);
    assert_eq!(p.pdp.cache_ttl_s, 60);
    assert_eq!(p.pdp.on_unavailable, OnUnavailable::Deny);
}

#[test]
fn revision_is_sha256_of_the_bytes() {
    let p = load("apiVersion: pep/v1\n");
    // sha256("apiVersion: pep/v1\n")
    assert_eq!(
        p.revision(),
        format!("sha256:{:x}", Sha256::digest(b"apiVersion: pep/v1\n"))
    );
    assert_eq!(p.revision().len(), "sha256:".len() + 64);
    assert_ne!(load("apiVersion: pep/v1\n#\n").revision(), p.revision());
}

#[test]
fn missing_sections_do_not_restrict() {
    let p = load("apiVersion: pep/v1\n");
    assert_eq!(p.name, None);
    assert_eq!(p.mode, Mode::Enforce);
    assert!(p.vars.is_empty());
    assert_eq!(
        p.network,
        NetworkSection {
            default: NetDefault::Allow,
            rules: vec![],
            dns: Default::default(),
        }
    );
    assert_eq!(
        p.files,
        FilesSection {
            default: Verdict::Allow,
            rules: vec![]
        }
    );
    assert_eq!(
        p.exec,
        ExecSection {
            default: Verdict::Allow,
            rules: vec![],
            ask: false
        }
    );
    assert_eq!(p.pdp, PdpConfig::default());
    // Present but empty sections, and sections without `default`.
    let p = load("apiVersion: pep/v1\nnetwork:\nfiles: {}\nexec:\n  rules: []\n");
    assert_eq!(p.network.default, NetDefault::Allow);
    assert_eq!(p.files.default, Verdict::Allow);
    assert!(p.exec.rules.is_empty());
}

#[test]
fn vars_expand_everywhere_and_in_order() {
    let p = load(
        "apiVersion: pep/v1
files:
  rules:
    - deny: { path: '${ws}/secret', access: [read] }
    - deny: { name: '${envfile}' }
network:
  rules:
    - deny: { cidr: '${meta}/32' }
    - deny: { domain: '${host}' }
vars:
  base: /srv
  ws: ${base}/project
  envfile: .env
  meta: 169.254.169.254
  host: api.example.com
",
    );
    assert_eq!(p.vars.get("ws"), Some("/srv/project"));
    assert_eq!(
        p.files.rules[0].target,
        FileTarget::Path(path("/srv/project/secret", false))
    );
    assert_eq!(
        p.files.rules[0].access,
        Access {
            read: true,
            write: false
        }
    );
    assert_eq!(p.files.rules[1].target, FileTarget::Name(FileName(".env".into())));
    assert_eq!(p.files.rules[1].access, Access::ALL);
    assert_eq!(
        p.network.rules[0].target,
        NetTarget::Cidr("169.254.169.254/32".parse().unwrap())
    );
    assert_eq!(
        p.network.rules[1].target,
        NetTarget::Domain(DomainPattern::parse("api.example.com").unwrap())
    );
}

#[test]
fn tilde_expands_to_the_sandbox_users_home() {
    let text = "apiVersion: pep/v1
vars: { cfg: ~/.config }
files:
  rules:
    - deny: { path: ~/.ssh/** }
    - deny: { path: '${cfg}/gh/hosts.yml' }
    - deny: { path: '~' }
exec:
  rules:
    - allow: { path: ~/bin/** }
";
    let p = load_str(text, "p.yaml", &LoadContext::new("/home/agent/")).unwrap();
    let targets: Vec<_> = p.files.rules.iter().map(|r| r.target.clone()).collect();
    assert_eq!(
        targets,
        [
            FileTarget::Path(path("/home/agent/.ssh", true)),
            FileTarget::Path(path("/home/agent/.config/gh/hosts.yml", false)),
            FileTarget::Path(path("/home/agent", false)),
        ]
    );
    assert_eq!(p.exec.rules[0].path, path("/home/agent/bin", true));
    // No home known: `~` is an error at its node.
    let err = load_str(text, "p.yaml", &LoadContext::new("")).unwrap_err();
    assert_eq!(err.location(), Some(Location { line: 5, column: 21 }));
    assert!(err.to_string().contains("home is not known"), "{err}");
}

#[test]
fn ports_protocols_and_cidrs() {
    let p = load(
        "apiVersion: pep/v1
network:
  default: ask
  rules:
    - allow: { cidr: 10.0.0.0/8, ports: 443 }
    - allow: { cidr: '2001:db8::/32', ports: ['1-1024', 65535, '22'], protocol: udp }
    - deny: { cidr: 192.0.2.7 }
    - deny: { cidr: '::1' }
    - deny: { cidr: '::ffff:10.1.0.0/112', ports: 9000-9100 }
",
    );
    assert_eq!(p.network.default, NetDefault::Ask);
    let r = &p.network.rules;
    assert_eq!(r[0].ports, [PortRange { lo: 443, hi: 443 }]);
    assert_eq!(
        r[1].ports,
        [
            PortRange { lo: 1, hi: 1024 },
            PortRange { lo: 65535, hi: 65535 },
            PortRange { lo: 22, hi: 22 }
        ]
    );
    assert_eq!(r[1].protocol, Some(Protocol::Udp));
    assert!(r[1].covers_protocol(17) && !r[1].covers_protocol(6));
    assert!(r[0].covers_protocol(6) && r[0].covers_protocol(1));
    assert!(r[1].covers_port(1024) && !r[1].covers_port(1025) && r[2].covers_port(1));
    assert_eq!(r[2].target, NetTarget::Cidr("192.0.2.7/32".parse().unwrap()));
    assert_eq!(r[3].target, NetTarget::Cidr("::1/128".parse().unwrap()));
    assert_eq!(r[4].ports, [PortRange { lo: 9000, hi: 9100 }]);
    assert!(
        parse_cidr("0.0.0.0/0")
            .unwrap()
            .contains(&IpAddr::V4(Ipv4Addr::LOCALHOST))
    );
}

#[test]
fn mode_and_pdp_engines() {
    let p = load(
        "apiVersion: pep/v1
mode: audit
pdp:
  engine: opa
  opa: { url: 'https://pdp.internal:8181/v1/data/x/allow' }
  cache_ttl_s: 0
  on_unavailable: stale
  busy_poll_us: 20000
",
    );
    assert_eq!(p.pdp.busy_poll_us, 20_000);
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.mode.to_kernel(), pep_common::sandbox::MODE_AUDIT);
    assert_eq!(p.pdp.engine, Engine::Opa);
    assert_eq!(p.pdp.opa.as_ref().unwrap().timeout_ms, DEFAULT_OPA_TIMEOUT_MS);
    assert_eq!(p.pdp.cache_ttl_s, 0);
    assert_eq!(p.pdp.on_unavailable, OnUnavailable::Stale);

    let p = load("apiVersion: pep/v1\npdp: { engine: rego, rego: { files: [/etc/pep/p.rego] } }\n");
    let rego = p.pdp.rego.unwrap();
    assert_eq!(rego.files, [PathBuf::from("/etc/pep/p.rego")]);
    assert_eq!(rego.query, DEFAULT_REGO_QUERY);
    assert_eq!(p.pdp.busy_poll_us, 0, "off unless asked for");
}

#[test]
fn load_file_names_the_file_and_resolves_rego_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, SPEC_EXAMPLE).unwrap();
    let p = load_file(&file, &ctx()).unwrap();
    assert_eq!(
        p.pdp.rego.as_ref().unwrap().files,
        [dir.path().join("policy.rego")]
    );
    assert_eq!(
        p.revision(),
        format!("sha256:{:x}", Sha256::digest(SPEC_EXAMPLE.as_bytes()))
    );

    std::fs::write(&file, "apiVersion: pep/v1\nnetwork:\n  defualt: deny\n").unwrap();
    let err = load_file(&file, &ctx()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:3:3: network: unknown field `defualt`, expected one of `default`, `rules`, `dns`",
            file.display()
        )
    );

    let missing = dir.path().join("missing.yaml");
    let err = load_file(&missing, &ctx()).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("{}: cannot read policy: ", missing.display())),
        "{err}"
    );
}
