//! Governance end to end (issue #4): the authorisation matrix, the project
//! lifecycle, concurrency of the ledger, the auditor's view of a signed log,
//! a kill -9 crash, and (mutual) TLS.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::AsArray;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tre_core::{Code, ProjectId, Role, UserId};
use tre_e2e::{Server, authed, fixture, open_state, start, start_in};
use tre_gateway::authz::Rpc;
use tre_gateway::{Issuer, Tls};
use tre_proto::v1 as pb;
use tre_proto::v1::admin_service_client::AdminServiceClient;
use tre_proto::v1::audit_service_client::AuditServiceClient;
use tre_proto::v1::catalog_service_client::CatalogServiceClient;
use tre_proto::v1::project_service_client::ProjectServiceClient;
use tre_proto::v1::query_service_client::QueryServiceClient;
use tre_proto::v1::release_service_client::ReleaseServiceClient;
use tre_store::{AuditFilter, Decision, ProjectRequest, chain};

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

use tre_e2e::status_code as code_of;

fn days(n: i64) -> chrono::NaiveDate {
    tre_store::today() + chrono::Duration::days(n)
}

fn pid(s: &str) -> ProjectId {
    ok(ProjectId::new(s))
}

/// A project requested by alice (a member with bob), put in `status` by a
/// custodian outside the test's view.
fn project_in(server: &Server, id: &str, status: &str) {
    let store = &server.state.store;
    ok(store.request_project(
        &ProjectRequest {
            id: pid(id),
            title: format!("project {id}"),
            purpose: "matrix fixture".into(),
            datasets: vec!["nhs_epr".into()],
            epsilon: ok(tre_core::Epsilon::new(5.0)),
            delta: tre_core::Delta::ZERO,
            members: vec![ok(UserId::new("alice")), ok(UserId::new("bob"))],
            end_date: days(30),
            requested_by: ok(UserId::new("alice")),
        },
        tre_store::today(),
    ));
    let setup = ok(UserId::new("setup"));
    let approve = Decision::Approve {
        epsilon: ok(tre_core::Epsilon::new(5.0)),
        delta: tre_core::Delta::ZERO,
        end_date: days(30),
    };
    let steps: &[Decision] = match status {
        "requested" => &[],
        "active" => std::slice::from_ref(&approve),
        "suspended" => &[approve.clone(), Decision::Suspend],
        other => panic!("{other}"),
    };
    for d in steps {
        let event = tre_store::AuditEvent::new("setup", "custodian", id, "project.fixture");
        ok(store.decide(&pid(id), d, &setup, "fixture", &event));
    }
}

/// A held release `id` in `project`, charged like a real one.
fn held_release(server: &Server, project: &str, id: &str) {
    let store = &server.state.store;
    let alice = ok(UserId::new("alice"));
    let p = pid(project);
    let nhs_epr = [tre_store::Lifetime {
        dataset: "nhs_epr",
        epsilon: ok(tre_core::Epsilon::new(100.0)),
        delta: tre_core::Delta::ZERO,
    }];
    let reserved = ok(store.reserve(&tre_store::Charge {
        project: &p,
        datasets: &nhs_epr,
        user: &alice,
        epsilon: ok(tre_core::Epsilon::new(0.001)),
        delta: tre_core::Delta::ZERO,
        plan_hash: id,
        today: tre_store::today(),
    }));
    let mut event = tre_store::AuditEvent::new("alice", "researcher", project, "query.submit");
    event.release_id = id.to_owned();
    ok(store.commit_release(
        reserved.ledger_id,
        &tre_store::StoredRelease {
            id: id.to_owned(),
            project: project.to_owned(),
            user: "alice".into(),
            plan_hash: id.to_owned(),
            body: "{}".into(),
            body_hash: chain::sha256_hex(b"{}"),
            created_at: tre_store::now(),
            status: tre_store::ReleaseStatus::Held,
            hold_reason: "fixture".into(),
            manifest: String::new(),
            reviews: vec![],
            review_notes: vec![],
        },
        &event,
    ));
}

/// Give a stored release a short id, for readable requests.
fn rename_release(server: &Server, from: &str, to: &str) {
    let conn = ok(rusqlite::Connection::open(
        server.state_dir.path().join("tre.db"),
    ));
    ok(conn.execute("UPDATE releases SET id = ?2 WHERE id = ?1", [from, to]));
}

/// Call `rpc` with `token` (empty: none) and a request that succeeds when
/// the caller is allowed. `tag` makes ids unique per call.
async fn call(ch: &Channel, rpc: Rpc, token: &str, tag: &str) -> Result<(), tonic::Status> {
    let q = || QueryServiceClient::new(ch.clone());
    let c = || CatalogServiceClient::new(ch.clone());
    let p = || ProjectServiceClient::new(ch.clone());
    let a = || AuditServiceClient::new(ch.clone());
    let decide = |id: &str| pb::DecideProjectRequest {
        id: id.to_owned(),
        reason: "matrix".into(),
    };
    let sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";
    let query = pb::QueryRequest {
        project: "p1".into(),
        sql: sql.into(),
        epsilon: Some(0.1),
        delta: None,
        totals: false,
        dataset: String::new(),
    };
    let m = |what: &str| format!("m-{what}-{tag}");
    let h = |what: &str| format!("h-{what}-{tag}");
    let r = || ReleaseServiceClient::new(ch.clone());
    let review = |id: &str| pb::ReviewReleaseRequest {
        id: id.to_owned(),
        reason: "matrix".into(),
    };
    match rpc {
        Rpc::Submit => q().submit(authed(query, token)).await.map(drop),
        Rpc::DryRun => q().dry_run(authed(query, token)).await.map(drop),
        Rpc::Budget => q()
            .budget(authed(
                pb::BudgetRequest {
                    project: "p1".into(),
                },
                token,
            ))
            .await
            .map(drop),
        Rpc::ListDatasets => c()
            .list_datasets(authed(pb::ListDatasetsRequest {}, token))
            .await
            .map(drop),
        Rpc::DescribeTable => c()
            .describe_table(authed(
                pb::DescribeTableRequest {
                    dataset: String::new(),
                    table: "patients".into(),
                },
                token,
            ))
            .await
            .map(drop),
        Rpc::RequestProject => p()
            .request_project(authed(
                pb::RequestProjectRequest {
                    id: format!("r-{tag}"),
                    title: "Deprivation and diabetes control".into(),
                    purpose: "Is HbA1c worse in more deprived areas?".into(),
                    datasets: vec!["nhs_epr".into()],
                    epsilon: 2.0,
                    delta: 0.0,
                    members: vec![],
                    end_date: days(60).to_string(),
                },
                token,
            ))
            .await
            .map(drop),
        Rpc::ListProjects => p()
            .list_projects(authed(pb::ListProjectsRequest::default(), token))
            .await
            .map(drop),
        Rpc::GetProject => p()
            .get_project(authed(pb::GetProjectRequest { id: "p1".into() }, token))
            .await
            .map(drop),
        Rpc::ApproveProject => p()
            .approve_project(authed(
                pb::ApproveProjectRequest {
                    id: m("approve"),
                    epsilon: Some(1.0),
                    delta: None,
                    end_date: String::new(),
                    reason: "ethics approval 24/NW/0001".into(),
                },
                token,
            ))
            .await
            .map(drop),
        Rpc::RejectProject => p()
            .reject_project(authed(decide(&m("reject")), token))
            .await
            .map(drop),
        Rpc::SuspendProject => p()
            .suspend_project(authed(decide(&m("suspend")), token))
            .await
            .map(drop),
        Rpc::ResumeProject => p()
            .resume_project(authed(decide(&m("resume")), token))
            .await
            .map(drop),
        Rpc::RevokeProject => p()
            .revoke_project(authed(decide(&m("revoke")), token))
            .await
            .map(drop),
        Rpc::TopUpProject => p()
            .top_up_project(authed(
                pb::TopUpProjectRequest {
                    id: m("topup"),
                    epsilon: 1.0,
                    delta: 0.0,
                    reason: "matrix".into(),
                },
                token,
            ))
            .await
            .map(drop),
        Rpc::ListEvents => a()
            .list_events(authed(pb::ListEventsRequest::default(), token))
            .await
            .map(drop),
        Rpc::VerifyLog => a()
            .verify_log(authed(pb::VerifyLogRequest::default(), token))
            .await
            .map(drop),
        Rpc::ExportLog => a()
            .export_log(authed(pb::ExportLogRequest {}, token))
            .await
            .map(drop),
        Rpc::GetRelease => r()
            .get_release(authed(pb::GetReleaseRequest { id: "r0".into() }, token))
            .await
            .map(drop),
        Rpc::ListReleases => r()
            .list_releases(authed(pb::ListReleasesRequest::default(), token))
            .await
            .map(drop),
        Rpc::ApproveRelease => r()
            .approve_release(authed(review(&h("approve")), token))
            .await
            .map(drop),
        Rpc::RejectRelease => r()
            .reject_release(authed(review(&h("reject")), token))
            .await
            .map(drop),
        Rpc::RequestChanges => r()
            .request_changes(authed(review(&h("changes")), token))
            .await
            .map(drop),
        Rpc::WithdrawRelease => r()
            .withdraw_release(authed(review(&h("withdraw")), token))
            .await
            .map(drop),
        Rpc::RevokeToken => AdminServiceClient::new(ch.clone())
            .revoke_token(authed(
                pb::RevokeTokenRequest {
                    jti: format!("unused-{tag}"),
                    reason: "matrix".into(),
                },
                token,
            ))
            .await
            .map(drop),
        // Closing a handle no one holds is allowed to whoever may close.
        Rpc::ClosePrepared => {
            use arrow_flight::sql::{ActionClosePreparedStatementRequest, ProstMessageExt};
            let body = ActionClosePreparedStatementRequest {
                prepared_statement_handle: format!("none-{tag}").into_bytes().into(),
            };
            let action = arrow_flight::Action::new(
                "ClosePreparedStatement",
                prost::Message::encode_to_vec(&body.as_any()),
            );
            let mut replies =
                arrow_flight::flight_service_client::FlightServiceClient::new(ch.clone())
                    .do_action(authed(action, token))
                    .await?
                    .into_inner();
            while replies.message().await?.is_some() {}
            Ok(())
        }
    }
}

/// Issue #4: every RPC called as every role, and with no, an expired, a
/// forged and a revoked token. The expected grid is written out here, apart
/// from the server's matrix, so that a change to either shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorisation_matrix() {
    let server = start(&[("p1", &["alice"], 10.0)]).await;
    //                                      researcher custodian auditor admin
    let expected: &[(Rpc, [bool; 4])] = &[
        (Rpc::Submit, [true, false, false, false]),
        (Rpc::DryRun, [true, false, false, false]),
        (Rpc::Budget, [true, true, true, false]),
        (Rpc::ListDatasets, [true, true, true, true]),
        (Rpc::DescribeTable, [true, true, true, true]),
        (Rpc::RequestProject, [true, false, false, false]),
        (Rpc::ListProjects, [true, true, true, false]),
        (Rpc::GetProject, [true, true, true, false]),
        (Rpc::ApproveProject, [false, true, false, false]),
        (Rpc::RejectProject, [false, true, false, false]),
        (Rpc::SuspendProject, [false, true, false, false]),
        (Rpc::ResumeProject, [false, true, false, false]),
        (Rpc::RevokeProject, [false, true, false, false]),
        (Rpc::TopUpProject, [false, true, false, false]),
        (Rpc::ListEvents, [false, false, true, false]),
        (Rpc::VerifyLog, [false, false, true, false]),
        (Rpc::ExportLog, [false, false, true, false]),
        (Rpc::RevokeToken, [false, false, false, true]),
        (Rpc::GetRelease, [true, true, false, false]),
        (Rpc::ListReleases, [true, true, false, false]),
        (Rpc::ApproveRelease, [false, true, false, false]),
        (Rpc::RejectRelease, [false, true, false, false]),
        (Rpc::RequestChanges, [false, true, false, false]),
        (Rpc::WithdrawRelease, [true, false, false, false]),
        (Rpc::ClosePrepared, [true, false, false, false]),
    ];
    assert_eq!(expected.len(), Rpc::ALL.len());

    let issuer = &server.state.issuer;
    let alice = ok(UserId::new("alice"));
    let mut expired = ok(Issuer::claims(&alice, Role::Researcher, 3600));
    expired.iat -= 7200;
    expired.exp -= 7200;
    let expired = ok(issuer.sign(&expired));
    let other_key = ok(tempfile::tempdir());
    let forged =
        ok(ok(Issuer::load_or_create(other_key.path())).issue(&alice, Role::Researcher, 3600));
    let revoked_claims = ok(Issuer::claims(&alice, Role::Researcher, 3600));
    let revoked = ok(issuer.sign(&revoked_claims));
    ok(server
        .state
        .store
        .revoke_token(&revoked_claims.jti, &ok(UserId::new("root")), "test"));

    // (who, token, refusal when not allowed)
    type Refusal = Option<(Code, tonic::Code)>;
    let identities: Vec<(&str, String, Refusal)> = vec![
        ("researcher", server.token("alice", Role::Researcher), None),
        ("custodian", server.token("carol", Role::Custodian), None),
        ("auditor", server.token("audrey", Role::Auditor), None),
        ("admin", server.token("root", Role::Admin), None),
        (
            "no token",
            String::new(),
            Some((Code::Unauthenticated, tonic::Code::Unauthenticated)),
        ),
        (
            "expired",
            expired,
            Some((Code::TokenExpired, tonic::Code::Unauthenticated)),
        ),
        (
            "forged",
            forged,
            Some((Code::Unauthenticated, tonic::Code::Unauthenticated)),
        ),
        (
            "revoked",
            revoked,
            Some((Code::TokenRevoked, tonic::Code::Unauthenticated)),
        ),
    ];
    // A released release r0 and, per identity, held releases to decide on.
    let ch = server.channel().await;
    let r0 = ok(QueryServiceClient::new(ch.clone())
        .submit(authed(
            pb::QueryRequest {
                project: "p1".into(),
                sql: "SELECT age_band, COUNT(*) AS n FROM patients GROUP BY age_band".into(),
                epsilon: Some(0.1),
                delta: None,
                totals: false,
                dataset: String::new(),
            },
            &server.token("alice", Role::Researcher),
        ))
        .await)
    .into_inner();
    assert_eq!(r0.status(), pb::ReleaseStatus::Released);
    rename_release(&server, &r0.release_id, "r0");
    for i in 0..identities.len() {
        let tag = format!("{i}");
        for what in ["approve", "reject", "changes", "withdraw"] {
            held_release(&server, "p1", &format!("h-{what}-{tag}"));
        }
        for (what, status) in [
            ("approve", "requested"),
            ("reject", "requested"),
            ("suspend", "active"),
            ("resume", "suspended"),
            ("revoke", "active"),
            ("topup", "active"),
        ] {
            project_in(&server, &format!("m-{what}-{tag}"), status);
        }
    }

    let mut cells = 0;
    for (rpc, allowed) in expected {
        for (i, (who, token, unauthenticated)) in identities.iter().enumerate() {
            let before = server.audit_len();
            let got = call(&ch, *rpc, token, &i.to_string()).await;
            let want_ok = i < 4 && allowed[i];
            match (&got, unauthenticated) {
                (Ok(()), None) if want_ok => {}
                (Err(s), None) if !want_ok => assert_eq!(
                    (code_of(s), s.code()),
                    (
                        Code::PermissionDenied.as_str().to_owned(),
                        tonic::Code::PermissionDenied
                    ),
                    "{rpc:?} as {who}: {}",
                    s.message()
                ),
                (Err(s), Some((code, grpc))) => assert_eq!(
                    (code_of(s), s.code()),
                    (code.as_str().to_owned(), *grpc),
                    "{rpc:?} with {who}: {}",
                    s.message()
                ),
                other => panic!("{rpc:?} as {who}: expected allowed={want_ok}, got {other:?}"),
            }
            assert_eq!(
                server.audit_len(),
                before + 1,
                "{rpc:?} as {who}: one audit event"
            );
            cells += 1;
        }
    }
    assert_eq!(cells, Rpc::ALL.len() * 8);
    // Every refusal was logged with its code and role.
    let refused = ok(server.state.store.audit_events(&AuditFilter {
        outcome: Some(tre_core::Outcome::Refused),
        ..AuditFilter::default()
    }));
    let allowed: usize = expected
        .iter()
        .map(|(_, a)| a.iter().filter(|x| **x).count())
        .sum();
    assert_eq!(refused.len(), Rpc::ALL.len() * 8 - allowed);
    assert!(refused.iter().all(|e| e.event.code.starts_with("TRE-A00")));
    // A refused call still records what it was about.
    for e in refused.iter().filter(|e| e.event.action == "query.submit") {
        assert_eq!(e.event.project, "p1");
        assert!(e.event.sql.starts_with("SELECT sex"), "{:?}", e.event);
    }
}

/// Issue #4: request → approve → query → suspend/resume → top up → revoke,
/// with self-approval refused and end dates enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_lifecycle_over_grpc() {
    let server = start(&[]).await;
    let ch = server.channel().await;
    let mut p = ProjectServiceClient::new(ch.clone());
    let mut q = QueryServiceClient::new(ch.clone());
    let alice = server.token("alice", Role::Researcher);
    let bob_custodian = server.token("bob", Role::Custodian);
    let carol = server.token("carol", Role::Custodian);
    let sql = |n: usize| {
        format!("SELECT sex, COUNT(*) AS n FROM patients WHERE year_of_birth > {n} GROUP BY sex")
    };
    let ask = |n: usize| pb::QueryRequest {
        project: "waits".into(),
        sql: sql(1900 + n),
        epsilon: Some(0.5),
        delta: None,
        totals: false,
        dataset: String::new(),
    };
    let info = ok(p
        .request_project(authed(
            pb::RequestProjectRequest {
                id: "waits".into(),
                title: "Waiting times and deprivation".into(),
                purpose: "Do people in poorer areas wait longer?".into(),
                datasets: vec!["nhs_epr".into()],
                epsilon: 3.0,
                delta: 1e-6,
                members: vec!["alice".into(), "bob".into()],
                end_date: days(90).to_string(),
            },
            &alice,
        ))
        .await)
    .into_inner();
    assert_eq!(
        (info.status.as_str(), info.requested_by.as_str()),
        ("requested", "alice")
    );

    let refused = |r: Result<tonic::Response<pb::QueryResponse>, tonic::Status>| {
        code_of(&r.expect_err("refused"))
    };
    assert_eq!(refused(q.submit(authed(ask(0), &alice)).await), "TRE-G001");
    // bob is a member: as a custodian he still may not approve.
    let approve = |eps: f64| pb::ApproveProjectRequest {
        id: "waits".into(),
        epsilon: Some(eps),
        delta: None,
        end_date: days(30).to_string(),
        reason: "fine".into(),
    };
    let s = p
        .approve_project(authed(approve(3.0), &bob_custodian))
        .await
        .expect_err("own project");
    assert_eq!(
        (code_of(&s), s.code()),
        ("TRE-A006".into(), tonic::Code::PermissionDenied)
    );
    let s = p
        .approve_project(authed(approve(4.0), &carol))
        .await
        .expect_err("more than requested");
    assert_eq!(code_of(&s), "TRE-G006");
    let info = ok(p.approve_project(authed(approve(1.0), &carol)).await).into_inner();
    assert_eq!(
        (
            info.status.as_str(),
            info.epsilon_budget,
            info.end_date.as_str()
        ),
        ("active", 1.0, days(30).to_string().as_str())
    );

    let r = ok(q.submit(authed(ask(1), &alice)).await).into_inner();
    assert!((r.epsilon_remaining - 0.5).abs() < 1e-9);
    let decide = |reason: &str| pb::DecideProjectRequest {
        id: "waits".into(),
        reason: reason.into(),
    };
    let s = p
        .suspend_project(authed(decide(""), &carol))
        .await
        .expect_err("no reason");
    assert_eq!(code_of(&s), "TRE-C003");
    ok(p.suspend_project(authed(decide("ethics review"), &carol))
        .await);
    assert_eq!(refused(q.submit(authed(ask(2), &alice)).await), "TRE-G001");
    ok(p.resume_project(authed(decide("review passed"), &carol))
        .await);
    ok(q.submit(authed(ask(3), &alice)).await);
    assert_eq!(refused(q.submit(authed(ask(4), &alice)).await), "TRE-B001");
    let info = ok(p
        .top_up_project(authed(
            pb::TopUpProjectRequest {
                id: "waits".into(),
                epsilon: 0.5,
                delta: 0.0,
                reason: "second wave of analysis approved by the board".into(),
            },
            &carol,
        ))
        .await)
    .into_inner();
    assert_eq!(info.epsilon_budget, 1.5);
    ok(q.submit(authed(ask(5), &alice)).await);

    // End dates: move the approved end into the past behind the server's back.
    let db = rusqlite::Connection::open(server.state_dir.path().join("tre.db"));
    ok(ok(db).execute(
        "UPDATE projects SET end_date = ?1 WHERE id = 'waits'",
        [days(-1).to_string()],
    ));
    assert_eq!(refused(q.submit(authed(ask(6), &alice)).await), "TRE-G002");

    ok(p.revoke_project(authed(decide("project closed"), &carol))
        .await);
    let s = p
        .resume_project(authed(decide("oops"), &carol))
        .await
        .expect_err("final");
    assert_eq!(code_of(&s), "TRE-G003");
    let info = ok(p
        .get_project(authed(pb::GetProjectRequest { id: "waits".into() }, &alice))
        .await)
    .into_inner();
    let actions: Vec<&str> = info.history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "request", "approve", "suspend", "resume", "top up", "revoke"
        ]
    );
    assert_eq!(
        info.history[4].reason,
        "second wave of analysis approved by the board"
    );
    // Researchers only see projects they are involved in.
    let dave = server.token("dave", Role::Researcher);
    let s = p
        .get_project(authed(pb::GetProjectRequest { id: "waits".into() }, &dave))
        .await
        .expect_err("not involved");
    // The same reply as an unknown id: which ids exist is not a researcher's
    // to learn (issue #11).
    assert_eq!(code_of(&s), "TRE-A003");
    let listed = ok(p
        .list_projects(authed(pb::ListProjectsRequest::default(), &dave))
        .await)
    .into_inner();
    assert!(listed.projects.is_empty());
}

/// Issue #4: 240 concurrent queries at a project that can afford 40 of
/// them. The sum charged never exceeds the budget and every charge matches
/// one release. Issue #11: a busy refusal (`TRE-S001`) charges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_never_overspend() {
    const N: usize = 240;
    const EPS: f64 = 0.05;
    let server = start(&[("p1", &["alice"], 2.0)]).await;
    let ch = server.channel().await;
    let token = server.token("alice", Role::Researcher);
    // One call first, so the HTTP/2 handshake is done: until the client has
    // the server's SETTINGS it assumes no stream limit, and a burst opened
    // before then gets REFUSED_STREAM beyond the server's 32 streams, a
    // transport error with no code that has nothing to do with budgets
    // (CI saw 68 of them once, issue #12).
    ok(QueryServiceClient::new(ch.clone())
        .budget(authed(
            pb::BudgetRequest {
                project: "p1".into(),
            },
            &token,
        ))
        .await);
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let mut q = QueryServiceClient::new(ch.clone());
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            q.submit(authed(
                pb::QueryRequest {
                    project: "p1".into(),
                    sql: format!(
                        "SELECT sex, COUNT(*) AS n FROM patients WHERE year_of_birth >= {} GROUP BY sex",
                        1900 + i
                    ),
                    epsilon: Some(EPS),
                    delta: None,
                    totals: false,
                    dataset: String::new(),
                },
                &token,
            ))
            .await
        }));
    }
    let mut released = HashSet::new();
    let mut refusals: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        match ok(t.await) {
            Ok(r) => {
                assert!(released.insert(r.into_inner().release_id));
            }
            Err(s) => *refusals.entry(code_of(&s)).or_default() += 1,
        }
    }
    eprintln!(
        "concurrency: {N} queries, {} released, refused {refusals:?}",
        released.len()
    );
    // Under a loaded machine some calls may wait out the engine's queue
    // (two slots a project) and be refused as busy, which charges nothing;
    // every other call is released or refused for lack of budget.
    let busy = refusals.remove("TRE-S001").unwrap_or(0);
    refusals.remove("TRE-B001");
    assert!(refusals.is_empty(), "only busy and budget refusals");
    if busy == 0 {
        assert_eq!(released.len(), 40);
    } else {
        assert!(released.len() <= 40);
    }
    let store = &server.state.store;
    let ledger = ok(store.ledger(&pid("p1")));
    let charged: i64 = ledger.iter().map(|l| l.epsilon_nanos).sum();
    let project = ok(store.project(&pid("p1")));
    assert_eq!(charged, project.epsilon_spent_nanos);
    assert!(charged <= project.epsilon_budget_nanos);
    let from_ledger: HashSet<String> = ledger
        .iter()
        .map(|l| {
            assert_eq!(l.status, tre_store::LedgerStatus::Released);
            l.release_id.clone().unwrap_or_default()
        })
        .collect();
    assert_eq!(from_ledger, released, "every charge matches one release");
    assert_eq!(
        ok(store.audit_events(&AuditFilter {
            action: Some("query.submit".into()),
            ..AuditFilter::default()
        }))
        .len(),
        N
    );
    assert!(ok(store.verify_audit()).is_intact());
}

/// Issue #4: the auditor lists and filters, verifies, and exports a log that
/// verifies offline with the public key alone; the server signs a
/// checkpoint at shutdown; tampering with the stored log is detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditor_verifies_and_exports_a_signed_log() {
    let mut server = start(&[("p1", &["alice"], 10.0)]).await;
    let ch = server.channel().await;
    let mut q = QueryServiceClient::new(ch.clone());
    let mut a = AuditServiceClient::new(ch.clone());
    let alice = server.token("alice", Role::Researcher);
    let auditor = server.token("audrey", Role::Auditor);
    for i in 0..12 {
        let r = q
            .submit(authed(
                pb::QueryRequest {
                    project: "p1".into(),
                    sql: if i % 3 == 0 {
                        "SELECT person_id FROM patients".into()
                    } else {
                        format!("SELECT sex, COUNT(*) AS n FROM patients WHERE year_of_birth > {} GROUP BY sex", 1900 + i)
                    },
                    epsilon: Some(0.1),
                    delta: None,
                    totals: false,
                    dataset: String::new(),
                },
                &alice,
            ))
            .await;
        assert_eq!(r.is_ok(), i % 3 != 0);
    }
    let all = ok(a
        .list_events(authed(pb::ListEventsRequest::default(), &auditor))
        .await)
    .into_inner()
    .events;
    let filtered = ok(a
        .list_events(authed(
            pb::ListEventsRequest {
                user: "alice".into(),
                action: "query.submit".into(),
                outcome: "refused".into(),
                ..Default::default()
            },
            &auditor,
        ))
        .await)
    .into_inner()
    .events;
    assert_eq!(filtered.len(), 4);
    assert!(
        filtered
            .iter()
            .all(|e| e.code == "TRE-Q010" && e.epsilon == 0.0)
    );
    // An outcome that is none is refused, not matched against nothing
    // (issue #12).
    let bogus = a
        .list_events(authed(
            pb::ListEventsRequest {
                outcome: "forged".into(),
                ..Default::default()
            },
            &auditor,
        ))
        .await;
    assert_eq!(tre_e2e::code_of(bogus), "TRE-C003");
    let released: Vec<_> = all.iter().filter(|e| !e.release_id.is_empty()).collect();
    assert_eq!(released.len(), 8);
    for e in &released {
        assert_eq!(
            (e.role.as_str(), e.plan_hash.len(), e.release_hash.len()),
            ("researcher", 64, 64)
        );
        assert!(e.client.starts_with("127.0.0.1:"), "{}", e.client);
        assert!((e.epsilon - 0.1).abs() < 1e-12);
    }
    let none = ok(a
        .list_events(authed(
            pb::ListEventsRequest {
                until: "2000-01-01T00:00:00Z".into(),
                ..Default::default()
            },
            &auditor,
        ))
        .await)
    .into_inner()
    .events;
    assert!(none.is_empty());

    let v = ok(a
        .verify_log(authed(pb::VerifyLogRequest::default(), &auditor))
        .await)
    .into_inner();
    assert!(v.intact, "{v:?}");
    assert_eq!(v.checkpointed_through, 10);
    let mut stream = ok(a
        .export_log(authed(pb::ExportLogRequest {}, &auditor))
        .await)
    .into_inner();
    let mut export = pb::ExportLogResponse::default();
    while let Some(chunk) = ok(stream.message().await) {
        export.jsonl.push_str(&chunk.jsonl);
        export.public_key = chunk.public_key;
    }
    let key = ok(hex::decode(&export.public_key));
    let public_file = ok(std::fs::read_to_string(
        server.state_dir.path().join("audit.pub"),
    ));
    assert_eq!(public_file.trim(), export.public_key);
    let offline = chain::verify_jsonl(&export.jsonl, &key);
    assert!(offline.is_intact(), "{offline:?}");
    // The export ends on a checkpoint signed at export time.
    assert_eq!(offline.checkpointed_through as usize, offline.events);
    let edited = export
        .jsonl
        .replacen("SELECT person_id", "SELECT sex_at_birth", 1);
    assert!(!chain::verify_jsonl(&edited, &key).is_intact());

    // Shutdown signs the head; then tamper with the database behind its back.
    server.shutdown().await;
    let db = server.state_dir.path().join("tre.db");
    let head: i64 = ok(ok(rusqlite::Connection::open(&db)).query_row(
        "SELECT MAX(seq) FROM checkpoints",
        [],
        |r| r.get(0),
    ));
    let events: i64 =
        ok(ok(rusqlite::Connection::open(&db))
            .query_row("SELECT MAX(seq) FROM audit", [], |r| r.get(0)));
    assert_eq!(
        head, events,
        "a checkpoint at shutdown covers the last event"
    );
    let conn = ok(rusqlite::Connection::open(&db));
    ok(conn.execute(
        "UPDATE audit SET epsilon_nanos = 0 WHERE release_id != '' AND seq = (SELECT MIN(seq) FROM audit WHERE release_id != '')",
        [],
    ));
    drop(conn);
    let reopened = open_state(server.state_dir.path(), &fixture().data, &[]);
    let report = ok(reopened.store.verify_audit());
    let bad = report
        .first_bad
        .unwrap_or_else(|| panic!("edit not detected"));
    assert!(bad.reason.contains("hash"), "{bad:?}");
}

/// The server process for `crash_recovery_keeps_every_charge`, which runs
/// this test binary again with TRE_CRASH_CHILD set. On its own it does
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var("TRE_CRASH_CHILD") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let data = std::path::PathBuf::from(std::env::var("TRE_CRASH_DATA").unwrap_or_default());
    let state = Arc::new(open_state(&dir, &data, &[("p1", &["alice"], 50.0)]));
    let (addr, _stop, _handle) =
        ok(tre_gateway::spawn(state, ok("127.0.0.1:0".parse()), None).await);
    ok(std::fs::write(
        dir.join("url.tmp"),
        format!("http://{addr}"),
    ));
    ok(std::fs::rename(dir.join("url.tmp"), dir.join("url")));
    // Serve until killed.
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// Issue #4: kill -9 the server while queries are in flight and restart it.
/// Every release has its charge and audit event, no charge is lost, every
/// charge is audited, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_recovery_keeps_every_charge() {
    let dir = ok(tempfile::tempdir());
    // The child serves this process's fixture.
    let data = &fixture().data;
    let mut child = ok(std::process::Command::new(ok(std::env::current_exe()))
        .args(["governance::crash_child", "--exact", "--nocapture"])
        .env("TRE_CRASH_CHILD", dir.path())
        .env("TRE_CRASH_DATA", data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn());
    let url_file = dir.path().join("url");
    let mut waited = 0;
    while !url_file.exists() {
        assert!(waited < 1200, "the child server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    let url = ok(std::fs::read_to_string(&url_file));
    // Tokens signed with the child's issuer key (same state directory).
    let issuer = ok(Issuer::load_or_create(dir.path()));
    let token = ok(issuer.issue(&ok(UserId::new("alice")), Role::Researcher, 3600));
    let ch = ok(ok(Channel::from_shared(url)).connect().await);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..60 {
        let mut q = QueryServiceClient::new(ch.clone());
        let token = token.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let r = q
                .submit(authed(
                    pb::QueryRequest {
                        project: "p1".into(),
                        sql: format!("SELECT a.admission_month, COUNT(*) AS n FROM admissions a JOIN patients p ON a.person_id = p.person_id WHERE p.year_of_birth >= {} GROUP BY a.admission_month", 1900 + i),
                        epsilon: Some(0.1),
                        delta: None,
                        totals: false,
                        dataset: String::new(),
                    },
                    &token,
                ))
                .await;
            let _ = done.send(r.ok().map(|r| r.into_inner().release_id));
        });
    }
    drop(done_tx);
    // Kill once a few releases are out and the rest are in flight.
    let mut client_saw = HashSet::new();
    while client_saw.len() < 5 {
        match done_rx.recv().await {
            Some(Some(id)) => {
                client_saw.insert(id);
            }
            Some(None) => {}
            None => break,
        }
    }
    ok(child.kill()); // SIGKILL
    ok(child.wait());
    while let Some(r) = done_rx.recv().await {
        if let Some(id) = r {
            client_saw.insert(id);
        }
    }

    // Restart on the same state directory.
    let state = Arc::new(open_state(dir.path(), data, &[]));
    let store = &state.store;
    let ledger = ok(store.ledger(&pid("p1")));
    let project = ok(store.project(&pid("p1")));
    let charged: i64 = ledger.iter().map(|l| l.epsilon_nanos).sum();
    assert_eq!(charged, project.epsilon_spent_nanos, "no charge lost");
    assert_eq!(ok(store.dataset_usage("nhs_epr")).epsilon_nanos, charged);
    let events = ok(store.audit_events(&AuditFilter {
        action: Some("query.submit".into()),
        ..AuditFilter::default()
    }));
    let audited_releases: HashSet<&str> = events
        .iter()
        .map(|e| e.event.release_id.as_str())
        .filter(|r| !r.is_empty())
        .collect();
    let mut interrupted = 0;
    for l in &ledger {
        match (l.status, &l.release_id) {
            (tre_store::LedgerStatus::Released, Some(id)) => {
                assert!(audited_releases.contains(id.as_str()))
            }
            (tre_store::LedgerStatus::Interrupted, None) => {
                interrupted += 1;
                let marker = format!("ledger entry {}:", l.id);
                assert!(
                    events.iter().any(|e| e.event.detail.starts_with(&marker)
                        && e.event.epsilon_nanos == l.epsilon_nanos),
                    "interrupted charge {} is audited",
                    l.id
                );
            }
            other => panic!("ledger entry {} in state {other:?}", l.id),
        }
    }
    let stored: HashSet<String> = ledger.iter().filter_map(|l| l.release_id.clone()).collect();
    assert!(
        client_saw.is_subset(&stored),
        "every release a client saw is stored"
    );
    assert!(ok(store.verify_audit()).is_intact());
    eprintln!(
        "crash: {} releases seen by clients, {} stored, {} charges interrupted and kept",
        client_saw.len(),
        stored.len(),
        interrupted
    );
    // And it serves again.
    let (addr, _stop, _h) =
        ok(tre_gateway::spawn(Arc::clone(&state), ok("127.0.0.1:0".parse()), None).await);
    let ch = ok(ok(Channel::from_shared(format!("http://{addr}")))
        .connect()
        .await);
    let b = ok(QueryServiceClient::new(ch)
        .budget(authed(
            pb::BudgetRequest {
                project: "p1".into(),
            },
            &token,
        ))
        .await)
    .into_inner();
    assert_eq!(
        tre_core::Epsilon::new(b.epsilon_spent)
            .map(|e| e.as_nanos())
            .ok(),
        Some(charged)
    );
    // An interrupted query is an incident (issue #10): the project waits
    // for a custodian, and the suspension is in the log.
    if interrupted > 0 {
        assert_eq!(b.status, "suspended");
        let suspensions = ok(store.audit_events(&AuditFilter {
            action: Some("project.suspend".into()),
            ..AuditFilter::default()
        }));
        assert!(
            suspensions
                .iter()
                .any(|e| e.event.user == tre_store::INCIDENT_ACTOR && e.event.project == "p1")
        );
    }
}

fn pki() -> (String, String, String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer as CaIssuer,
        KeyPair,
    };
    let ca_key = ok(KeyPair::generate());
    let mut ca = ok(CertificateParams::new(Vec::<String>::new()));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ok(ca.self_signed(&ca_key));
    let ca_issuer = CaIssuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, purpose| {
        let key = ok(KeyPair::generate());
        let mut params = ok(CertificateParams::new(names));
        params.extended_key_usages = vec![purpose];
        let cert = ok(params.signed_by(&key, &ca_issuer));
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(vec!["alice".into()], ExtendedKeyUsagePurpose::ClientAuth);
    (
        ca_cert.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    )
}

/// Issue #4: TLS with client certificates. A client with a certificate from
/// the configured CA gets through (and the audit log records its
/// fingerprint); without one, or over plaintext, it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let (ca, server_cert, server_key, client_cert, client_key) = pki();
    let server = start_in(
        ok(tempfile::tempdir()),
        &fixture().data,
        &[],
        Some(Tls {
            cert_pem: server_cert.into_bytes(),
            key_pem: server_key.into_bytes(),
            client_ca_pem: Some(ca.clone().into_bytes()),
        }),
    )
    .await;
    let token = server.token("alice", Role::Researcher);
    let connect = |identity: bool| {
        let url = server.url.clone();
        let (ca, client_cert, client_key) = (ca.clone(), client_cert.clone(), client_key.clone());
        let token = token.clone();
        async move {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost");
            if identity {
                tls = tls.identity(Identity::from_pem(client_cert, client_key));
            }
            let ch = Channel::from_shared(url).map_err(|e| e.to_string())?;
            let ch = ch.tls_config(tls).map_err(|e| e.to_string())?;
            let ch = ch.connect().await.map_err(|e| e.to_string())?;
            CatalogServiceClient::new(ch)
                .list_datasets(authed(pb::ListDatasetsRequest {}, &token))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    assert_eq!(connect(true).await, Ok(()));
    assert!(connect(false).await.is_err(), "no client certificate");
    let plain = Channel::from_shared(server.url.replace("https://", "http://"));
    let plain = match ok(plain).connect().await {
        Ok(ch) => CatalogServiceClient::new(ch)
            .list_datasets(authed(pb::ListDatasetsRequest {}, &token))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!plain, "plaintext to a TLS port");
    let events = ok(server.state.store.audit_events(&AuditFilter::default()));
    assert_eq!(events.len(), 1);
    assert!(
        events[0].event.client.contains(" mtls:"),
        "{}",
        events[0].event.client
    );
}

/// Issue #5: a release with a suppressed cell is held: invisible to the
/// researcher until a custodian who is not on the project approves it; its
/// signed manifest then verifies offline, and fails on any change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airlock_holds_flagged_releases_until_a_custodian_approves() {
    let server = start(&[("p1", &["alice"], 10.0)]).await;
    let ch = server.channel().await;
    let mut q = QueryServiceClient::new(ch.clone());
    let mut r = ReleaseServiceClient::new(ch.clone());
    let alice = server.token("alice", Role::Researcher);
    let alice_custodian = server.token("alice", Role::Custodian);
    let carol = server.token("carol", Role::Custodian);
    let ask = |sql: &str| pb::QueryRequest {
        project: "p1".into(),
        sql: sql.into(),
        epsilon: Some(0.5),
        delta: None,
        totals: false,
        dataset: String::new(),
    };
    // Young patients by age band and sex: most cells are small.
    let small = "SELECT age_band, sex, COUNT(*) AS n FROM patients WHERE year_of_birth > 2010 GROUP BY age_band, sex";
    let held = ok(q.submit(authed(ask(small), &alice)).await).into_inner();
    assert_eq!(held.status(), pb::ReleaseStatus::Held);
    assert!(held.rows.is_empty() && held.hold_reason.contains("suppressed"));
    assert!(
        held.notes[0].starts_with("awaiting review"),
        "{:?}",
        held.notes
    );
    assert!(
        (held.epsilon_spent - 0.5).abs() < 1e-12,
        "the query ran, so it is charged"
    );
    let id = held.release_id.clone();
    let reader = r.clone();
    let get = |token: &str| {
        let mut r = reader.clone();
        let token = token.to_owned();
        let id = id.clone();
        async move {
            r.get_release(authed(pb::GetReleaseRequest { id }, &token))
                .await
                .map(|x| x.into_inner())
        }
    };
    // The researcher sees only that it waits; a repeat is no way round it.
    let mine = ok(get(&alice).await);
    let mine_release = mine.release.unwrap_or_default();
    assert!(
        mine_release.rows.is_empty() && mine.table_json.is_empty() && mine.manifest_json.is_empty()
    );
    let again = ok(q.submit(authed(ask(small), &alice)).await).into_inner();
    assert!(again.repeated && again.rows.is_empty() && again.status() == pb::ReleaseStatus::Held);
    // The reviewing custodian sees the table; a custodian on the project
    // does not get round the airlock.
    let theirs = ok(get(&carol).await);
    assert!(!theirs.release.unwrap_or_default().rows.is_empty());
    let own = ok(get(&alice_custodian).await);
    assert!(own.release.unwrap_or_default().rows.is_empty() && own.table_json.is_empty());
    let queue = ok(r
        .list_releases(authed(
            pb::ListReleasesRequest {
                project: String::new(),
                status: pb::ReleaseStatus::Held as i32,
            },
            &carol,
        ))
        .await)
    .into_inner();
    assert_eq!(queue.releases.len(), 1);
    assert_eq!(queue.releases[0].sql, small);
    // A status number this server does not know is refused, never read as
    // "all releases" (issue #12).
    let unknown = r
        .list_releases(authed(
            pb::ListReleasesRequest {
                project: String::new(),
                status: 99,
            },
            &carol,
        ))
        .await;
    assert_eq!(tre_e2e::code_of(unknown), "TRE-C003");

    let review = |reason: &str| pb::ReviewReleaseRequest {
        id: id.clone(),
        reason: reason.into(),
    };
    let s = r
        .approve_release(authed(review(""), &alice))
        .await
        .expect_err("researchers do not review");
    assert_eq!(code_of(&s), "TRE-A002");
    let s = r
        .approve_release(authed(review(""), &alice_custodian))
        .await
        .expect_err("a member does not review her own project");
    assert_eq!(code_of(&s), "TRE-A006");
    let s = r
        .reject_release(authed(review(""), &carol))
        .await
        .expect_err("no reason");
    assert_eq!(code_of(&s), "TRE-C003");
    let done = ok(r
        .approve_release(authed(review("suppression pattern is safe"), &carol))
        .await)
    .into_inner();
    assert_eq!(done.status(), pb::ReleaseStatus::Released);
    let s = r
        .approve_release(authed(review("again"), &carol))
        .await
        .expect_err("already decided");
    assert_eq!(code_of(&s), "TRE-R002");

    // Now the researcher sees it, with a manifest that verifies offline.
    let released = ok(get(&alice).await);
    assert!(!released.release.unwrap_or_default().rows.is_empty());
    let manifest: tre_store::manifest::SignedManifest =
        ok(serde_json::from_str(&released.manifest_json));
    let key = ok(hex::decode(&released.public_key));
    assert_eq!(
        manifest.verify(released.table_json.as_bytes(), &key),
        Ok(())
    );
    let m = &manifest.manifest;
    assert_eq!(
        (m.sql.as_str(), m.epsilon_nanos, m.sdc_profile.as_str()),
        (small, 500_000_000, "nhs_sde")
    );
    assert_eq!(
        m.policy_sha256,
        server.state.engines.now().first().policy().source_hash
    );
    assert_eq!(
        m.dataset_snapshot_sha256,
        server.state.engines.now().first().snapshot_hash()
    );
    assert!(m.cells.suppressed > 0 && m.sdc_outcome == "review");
    let outcomes = m.cell_outcomes.len() as u64;
    assert_eq!(
        outcomes,
        m.cells.released + m.cells.rounded + m.cells.suppressed
    );
    assert!(
        m.cell_outcomes
            .iter()
            .any(|o| o.starts_with("suppressed: threshold"))
    );
    let tampered_table = released.table_json.replacen("\"value\":", "\"value\":1", 1);
    assert!(manifest.verify(tampered_table.as_bytes(), &key).is_err());

    // Every step is in the audit log.
    let events = ok(server.state.store.audit_events(&AuditFilter::default()));
    let actions: Vec<&str> = events
        .iter()
        .filter(|e| e.event.release_id == id)
        .map(|e| e.event.action.as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "query.submit",
            "release.show",
            "query.submit",
            "release.show",
            "release.show",
            "release.approve",
            "release.approve",
            "release.reject",
            "release.approve",
            "release.approve",
            "release.show"
        ]
    );

    // Reject, request changes and withdraw end a held release for good.
    for (i, step) in ["reject", "changes", "withdraw"].into_iter().enumerate() {
        let sql = format!(
            "SELECT age_band, sex, COUNT(*) AS n FROM patients WHERE year_of_birth > {} GROUP BY age_band, sex",
            2011 + i
        );
        let h = ok(q.submit(authed(ask(&sql), &alice)).await).into_inner();
        assert_eq!(h.status(), pb::ReleaseStatus::Held);
        let req = pb::ReviewReleaseRequest {
            id: h.release_id.clone(),
            reason: "not this one".into(),
        };
        let out = match step {
            "reject" => ok(r.reject_release(authed(req, &carol)).await),
            "changes" => ok(r.request_changes(authed(req, &carol)).await),
            _ => ok(r.withdraw_release(authed(req, &alice)).await),
        }
        .into_inner();
        let want = [
            pb::ReleaseStatus::Rejected,
            pb::ReleaseStatus::ChangesRequested,
            pb::ReleaseStatus::Withdrawn,
        ][i];
        assert_eq!(out.status(), want);
        let seen = ok(r
            .get_release(authed(pb::GetReleaseRequest { id: h.release_id }, &alice))
            .await)
        .into_inner();
        let seen = seen.release.unwrap_or_default();
        assert!(seen.rows.is_empty() && seen.status() == want);
    }
}

/// Issue #5: a release with totals carries row, column and grand totals,
/// and no suppressed cell can be worked out from the cells and totals shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_keep_suppressed_cells_unsolvable() {
    let server = start(&[("p1", &["alice"], 10.0)]).await;
    let ch = server.channel().await;
    let mut q = QueryServiceClient::new(ch.clone());
    let mut r = ReleaseServiceClient::new(ch.clone());
    let alice = server.token("alice", Role::Researcher);
    let carol = server.token("carol", Role::Custodian);
    let ask = |sql: &str, totals: bool| pb::QueryRequest {
        project: "p1".into(),
        sql: sql.into(),
        epsilon: Some(1.0),
        delta: None,
        totals,
        dataset: String::new(),
    };
    // Refused shapes cost nothing.
    for sql in [
        "SELECT age_band, AVG(year_of_birth) AS y FROM patients GROUP BY age_band",
        "SELECT age_band, COUNT(*) AS n FROM patients GROUP BY age_band ORDER BY n DESC",
        "SELECT COUNT(*) AS n, age_band FROM patients GROUP BY age_band",
    ] {
        let s = q
            .dry_run(authed(ask(sql, true), &alice))
            .await
            .expect_err(sql);
        assert_eq!(code_of(&s), "TRE-Q028", "{sql}: {}", s.message());
    }
    let sql = "SELECT age_band, sex, COUNT(*) AS n FROM patients WHERE year_of_birth > 1995 GROUP BY age_band, sex";
    let with = ok(q.dry_run(authed(ask(sql, true), &alice)).await).into_inner();
    let without = ok(q.dry_run(authed(ask(sql, false), &alice)).await).into_inner();
    assert_ne!(
        with.plan_hash, without.plan_hash,
        "totals are part of the plan"
    );

    let held = ok(q.submit(authed(ask(sql, true), &alice)).await).into_inner();
    // Small cells: the release is held; the custodian sees the table.
    assert_eq!(held.status(), pb::ReleaseStatus::Held);
    let got = ok(r
        .get_release(authed(
            pb::GetReleaseRequest {
                id: held.release_id,
            },
            &carol,
        ))
        .await)
    .into_inner()
    .release
    .unwrap_or_default();
    // 5 age bands x 2 sexes, 5 row totals, 2 column totals, 1 grand total.
    assert_eq!(got.rows.len(), 18);
    let key = |row: &pb::Row, i: usize| match &row.cells[i].content {
        Some(pb::cell::Content::Key(k)) => k.clone(),
        other => panic!("{other:?}"),
    };
    let value = |row: &pb::Row| match &row.cells[2].content {
        Some(pb::cell::Content::Value(v)) => v.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (key(&got.rows[10], 1), key(&got.rows[15], 0)),
        ("Total".into(), "Total".into())
    );
    assert_eq!(
        (key(&got.rows[17], 0), key(&got.rows[17], 1)),
        ("Total".into(), "Total".into())
    );
    // Same layout as secondary::two_way: cells row by row, row totals,
    // column totals, grand total.
    let (_, lines) = tre_sdc::secondary::two_way(5, 2);
    let suppressed: Vec<bool> = got
        .rows
        .iter()
        .map(|row| value(row).value.is_none())
        .collect();
    assert!(
        suppressed.iter().any(|s| *s),
        "the test needs suppressed cells"
    );
    assert!(
        tre_sdc::secondary::exposed(&suppressed, &lines).is_empty(),
        "a suppressed cell is fixed by what is shown: {suppressed:?}"
    );
    assert!(
        got.rows
            .iter()
            .any(|row| value(row).reason.starts_with("secondary suppression"))
            || suppressed.iter().filter(|s| **s).count() >= 2
    );
    // Shown totals agree with their shown cells up to rounding and noise.
    for (t, l) in lines.iter().enumerate().take(7) {
        let (Some(total), true) = (
            value(&got.rows[l.total]).value,
            l.members.iter().all(|m| !suppressed[*m]),
        ) else {
            continue;
        };
        let sum: f64 = l
            .members
            .iter()
            .filter_map(|m| value(&got.rows[*m]).value)
            .sum();
        let slack = 2.5 * (l.members.len() as f64 + 1.0);
        assert!(
            (total - sum).abs() <= slack,
            "line {t}: total {total}, cells {sum}"
        );
    }
}

/// Issue #10, finding 5: rules on exact values never decide anything the
/// researcher sees. Under `acro_default`, which opts in to them, a query
/// over fewer than 10 patients and one over many are both held, with the
/// same reason and notes and no rows; only a custodian who may review a
/// release sees what the exact rules found, and approving releases the
/// table as the noisy rules left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_rules_never_decide_what_the_researcher_sees() {
    let f = fixture();
    let server = tre_e2e::start_with_profile(
        &tre_e2e::POLICY.replace(
            "sdc_profile = \"nhs_sde\"",
            "sdc_profile = \"acro_default\"",
        ),
        include_str!("../policies/sdc/acro_default.toml"),
        &[("p1", &["alice"], 20.0)],
    )
    .await;
    // Exact patient counts, from the plaintext copy, to pick a small and a
    // large group.
    let ctx = datafusion::prelude::SessionContext::new();
    ok(ctx
        .register_parquet(
            "patients",
            f.plaintext
                .join("patients.parquet")
                .to_string_lossy()
                .as_ref(),
            Default::default(),
        )
        .await);
    let exact = |pred: String| {
        let ctx = ctx.clone();
        async move {
            let b = ok(ok(ctx
                .sql(&format!(
                    "SELECT COUNT(*) FROM patients WHERE NOT research_opt_out AND {pred}"
                ))
                .await)
            .collect()
            .await);
            b[0].column(0)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0)
        }
    };
    let mut few = None;
    for year in 1930..2024 {
        let pred = format!("year_of_birth = {year} AND region = 'London'");
        if (1..10).contains(&exact(pred.clone()).await) {
            few = Some(pred);
            break;
        }
    }
    let few = few.unwrap_or_else(|| panic!("no small group in the fixture"));
    let many = "year_of_birth < 1990".to_owned();
    assert!(exact(many.clone()).await >= 10);

    let ch = server.channel().await;
    let mut q = QueryServiceClient::new(ch.clone());
    let mut r = ReleaseServiceClient::new(ch);
    let alice = server.token("alice", Role::Researcher);
    let carol = server.token("carol", Role::Custodian);
    let mut replies = Vec::new();
    for pred in [&few, &many] {
        let sql =
            format!("SELECT SUM(CASE WHEN TRUE THEN 1 ELSE 0 END) AS n FROM patients WHERE {pred}");
        let reply = ok(q
            .submit(authed(
                pb::QueryRequest {
                    project: "p1".into(),
                    sql,
                    epsilon: Some(1.0),
                    delta: None,
                    totals: false,
                    dataset: String::new(),
                },
                &alice,
            ))
            .await)
        .into_inner();
        replies.push(reply);
    }
    // Identical to the researcher, whatever the exact counts.
    for reply in &replies {
        assert_eq!(reply.status(), pb::ReleaseStatus::Held);
        assert!(reply.rows.is_empty());
        assert_eq!(reply.hold_reason, replies[0].hold_reason);
        assert_eq!(reply.notes, replies[0].notes);
    }
    assert!(
        replies[0].hold_reason.contains("checks exact values"),
        "{}",
        replies[0].hold_reason
    );
    let notes_for = |token: &str, id: &str| {
        let mut r = r.clone();
        let req = authed(pb::GetReleaseRequest { id: id.into() }, token);
        async move { ok(r.get_release(req).await).into_inner().review_notes }
    };
    let (small, large) = (&replies[0].release_id, &replies[1].release_id);
    assert!(
        notes_for(&alice, small).await.is_empty(),
        "researchers never see them"
    );
    let found = notes_for(&carol, small).await;
    assert!(
        found.iter().any(|n| n.contains("minimum patients")),
        "the reviewer sees the exact finding: {found:?}"
    );
    assert!(
        notes_for(&carol, large).await.is_empty(),
        "no finding on a large group"
    );
    // Approved, the table is as the rules on noisy values left it.
    ok(r.approve_release(authed(
        pb::ReviewReleaseRequest {
            id: large.clone(),
            reason: "reviewed".into(),
        },
        &carol,
    ))
    .await);
    let released = ok(r
        .get_release(authed(pb::GetReleaseRequest { id: large.clone() }, &alice))
        .await)
    .into_inner();
    let rows = released.release.map(|x| x.rows).unwrap_or_default();
    assert_eq!(rows.len(), 1);
}

/// Issue #5: with `mode = "always"` and two approvals, every release waits
/// for two different custodians, neither of them on the project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_custodians_must_approve_when_the_policy_says_so() {
    let policy = tre_e2e::POLICY.replace(
        "mode = \"flagged\"\nmax_cells = 2000\napprovals = 1",
        "mode = \"always\"\nmax_cells = 2000\napprovals = 2",
    );
    assert_ne!(
        policy,
        tre_e2e::POLICY,
        "the shipped [review] section changed"
    );
    let server = tre_e2e::start_with_policy(&policy, &[("p1", &["alice"], 10.0)]).await;
    let ch = server.channel().await;
    let mut q = QueryServiceClient::new(ch.clone());
    let mut r = ReleaseServiceClient::new(ch.clone());
    let alice = server.token("alice", Role::Researcher);
    let held = ok(q
        .submit(authed(
            pb::QueryRequest {
                project: "p1".into(),
                sql: "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex".into(),
                epsilon: Some(0.5),
                delta: None,
                totals: false,
                dataset: String::new(),
            },
            &alice,
        ))
        .await)
    .into_inner();
    assert_eq!(
        held.status(),
        pb::ReleaseStatus::Held,
        "always reviewed, even with nothing suppressed"
    );
    assert!(held.hold_reason.contains("every release"));
    let review = || pb::ReviewReleaseRequest {
        id: held.release_id.clone(),
        reason: "checked".into(),
    };
    let carol = server.token("carol", Role::Custodian);
    let dan = server.token("dan", Role::Custodian);
    // (reviewer, status afterwards)
    for (who, want) in [
        (&carol, pb::ReleaseStatus::Held),
        (&carol, pb::ReleaseStatus::Held),
        (&dan, pb::ReleaseStatus::Released),
    ] {
        let s = ok(r.approve_release(authed(review(), who)).await).into_inner();
        assert_eq!(s.status(), want);
    }
    let got = ok(r
        .get_release(authed(
            pb::GetReleaseRequest {
                id: held.release_id.clone(),
            },
            &alice,
        ))
        .await)
    .into_inner();
    assert_eq!(got.reviews.len(), 3);
    assert_eq!(got.release.unwrap_or_default().rows.len(), 2);
}
