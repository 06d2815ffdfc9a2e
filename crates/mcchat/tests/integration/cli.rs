//! The command line's own behaviour: errors, help, rooms, completions and the man page.

use crate::util::{TempDir, require_netns, run};

/// An environment where no rooms file is found, so the built-in rooms are used.
fn clean_env(dir: &TempDir) -> Vec<(&'static str, String)> {
    vec![
        ("HOME", dir.path().display().to_string()),
        (
            "XDG_CONFIG_HOME",
            dir.path().join("xdg").display().to_string(),
        ),
    ]
}

fn run_in(dir: &TempDir, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let env = clean_env(dir);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut cmd = std::process::Command::new(crate::util::bin());
    cmd.args(args)
        .current_dir(dir.path())
        .env_remove("MCCHAT_ROOMS")
        .env_remove("MCCHAT_NAME")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    crate::util::output(cmd)
}

#[test]
fn rooms_lists_the_built_in_rooms_without_any_file() {
    let dir = TempDir::new();
    let (st, out, err) = run_in(&dir, &["rooms"]);
    assert!(st.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "rooms from built-in rooms");
    assert!(out.contains("room1  239.255.77.1:5555"), "{out}");
    assert!(out.contains("room2  239.255.77.2:5556"), "{out}");
    assert!(out.contains("[ff15::6d63:1]:5557"), "{out}");
}

#[test]
fn rooms_file_in_working_directory_and_xdg_are_found() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path().join("xdg/mcchat")).unwrap();
    dir.write(
        "xdg/mcchat/rooms.toml",
        "[rooms.fromxdg]\ngroup = \"239.255.9.9\"\nport = 9\n",
    );
    let (st, out, _) = run_in(&dir, &["rooms"]);
    assert!(st.success());
    assert!(
        out.contains("fromxdg") && out.contains("(user config)"),
        "{out}"
    );
    dir.write(
        "rooms.toml",
        "[rooms.fromcwd]\ngroup = \"239.255.9.8\"\nport = 9\n",
    );
    let (_, out, _) = run_in(&dir, &["rooms"]);
    assert!(out.contains("fromcwd") && !out.contains("fromxdg"), "{out}");
}

#[test]
fn bad_rooms_file_is_one_clear_line_and_exit_1() {
    let dir = TempDir::new();
    let path = dir.write("bad.toml", "[rooms.a]\ngroup = \"10.1.2.3\"\nport = 5\n");
    let (st, out, err) = run_in(&dir, &["--rooms", &path, "join", "a", "--name", "x"]);
    assert_eq!(st.code(), Some(1));
    assert!(out.is_empty());
    assert_eq!(
        err,
        format!(
            "mcchat: {path}: room \"a\": key `group`: 10.1.2.3 is not a multicast address; use \
             one in 239.255.0.0/16 (IPv4) or ff15::/16 (IPv6)\n"
        )
    );
    let path = dir.write("typo.toml", "[rooms.a]\ngroup = \"239.1.1.1\"\nprot = 5\n");
    let (st, _, err) = run_in(&dir, &["--rooms", &path, "rooms"]);
    assert_eq!(st.code(), Some(1));
    assert!(
        err.starts_with(&format!("mcchat: {path}: room \"a\": unknown field `prot`")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn missing_rooms_file_names_where_it_came_from() {
    let dir = TempDir::new();
    let (st, _, err) = run(&["rooms"], &[("MCCHAT_ROOMS", "/nonexistent/r.toml")]);
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        err,
        "mcchat: cannot read rooms file /nonexistent/r.toml (named by $MCCHAT_ROOMS): No such \
         file or directory (os error 2)\n"
    );
    drop(dir);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["join", "bad room", "--name", "x"][..],
        &["join", "room1", "--name", "a|b"],
        &["send", "room1", "--name", "x"],
        &["listen", "room1", "--ttl", "300"],
        &["frobnicate"],
    ] {
        let (st, _, err) = run(args, &[]);
        assert_eq!(st.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
}

#[test]
fn every_subcommand_has_help_with_examples() {
    for sub in [
        &[][..],
        &["join"],
        &["send"],
        &["listen"],
        &["rooms"],
        &["completions"],
        &["man"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let (st, out, _) = run(&args, &[]);
        assert!(st.success(), "{args:?}");
        assert!(out.contains("Examples:"), "{args:?}: {out}");
    }
}

#[test]
fn completions_and_man_page_are_generated() {
    let (st, out, _) = run(&["completions", "bash"], &[]);
    assert!(st.success());
    assert!(out.contains("_mcchat()") && out.contains("listen"), "{out}");
    let (st, out, _) = run(&["completions", "zsh"], &[]);
    assert!(st.success() && out.contains("#compdef mcchat"));
    let (st, out, _) = run(&["man"], &[]);
    assert!(st.success());
    assert!(
        out.contains(".TH mcchat 1") && out.contains("join"),
        "{out}"
    );
}

#[test]
fn unknown_interface_is_a_clear_error() {
    require_netns();
    let (st, _, err) = run(&["listen", "room1", "--iface", "nosuch0"], &[]);
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        err,
        "mcchat: interface \"nosuch0\": no such interface; list them with `ip link`\n"
    );
    let (st, _, err) = run(&["listen", "room1", "--iface", "198.51.100.77"], &[]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("no interface has this address"), "{err}");
}

#[test]
fn interface_by_name_and_address_work() {
    require_netns();
    for iface in ["lo", "127.0.0.1"] {
        let room = crate::util::unique("if");
        let l =
            crate::util::Proc::mcchat("listener", None, &["listen", &room, "--iface", iface], &[])
                .listening();
        let (st, _, err) = run(
            &["send", &room, "--name", "x", "--iface", iface, "via", iface],
            &[],
        );
        assert!(st.success(), "{err}");
        l.expect_out(&format!("x: via {iface}"));
    }
}
