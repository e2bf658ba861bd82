//! The store's business rules as pure functions on the domain types: what
//! a project request must satisfy, what each custodian decision does to a
//! project, whether a project can pay for a query (admission), and where
//! an airlock review leaves a release. The SQLite implementation only
//! applies their answers, so the rules are unit-tested without a database
//! (issue #12).

use chrono::NaiveDate;

use crate::{
    Charge, DatasetUsage, Decision, Project, ProjectRequest, ProjectStatus, ReleaseStatus,
    ReviewAction, StoreError,
};

/// `a + b`, or a coded refusal when a budget would overflow the ledger.
pub(crate) fn checked_add(a: i64, b: i64) -> Result<i64, StoreError> {
    a.checked_add(b)
        .ok_or_else(|| StoreError::InvalidRequest("the budget is too large".into()))
}

fn end_in_future(end: NaiveDate, today: NaiveDate) -> Result<(), StoreError> {
    if end < today {
        return Err(StoreError::InvalidRequest(format!(
            "the end date {end} is in the past; choose a future date"
        )));
    }
    Ok(())
}

impl ProjectRequest {
    /// Whether the request may be stored: a title and a lay summary, at
    /// least one dataset and member, and an end date not in the past.
    pub fn validate(&self, today: NaiveDate) -> Result<(), StoreError> {
        if self.title.trim().is_empty() || self.purpose.trim().is_empty() {
            return Err(StoreError::InvalidRequest(
                "a project needs a title and a lay summary of its purpose".into(),
            ));
        }
        if self.datasets.is_empty() || self.members.is_empty() {
            return Err(StoreError::InvalidRequest(
                "name at least one dataset and one member".into(),
            ));
        }
        end_in_future(self.end_date, today)
    }
}

/// What a decision makes of a project: its new status, budgets and end,
/// and what the project's history records as granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub status: ProjectStatus,
    pub epsilon_budget_nanos: i64,
    pub delta_budget_femtos: i64,
    pub end_date: Option<NaiveDate>,
    /// The budget approved or added by this decision (zero for the rest).
    pub granted_epsilon_nanos: i64,
    pub granted_delta_femtos: i64,
}

impl Project {
    /// The project after `decision`, or why the decision cannot be made.
    /// Approve and reject decide a request; suspend pauses an active
    /// project and resume restarts it; revoke and top-up apply to active
    /// and suspended projects. Nothing else moves: rejected and revoked
    /// are final.
    pub fn transition(
        &self,
        decision: &Decision,
        today: NaiveDate,
    ) -> Result<Transition, StoreError> {
        use ProjectStatus::{Active, Rejected, Requested, Revoked, Suspended};
        let to = |status| Transition {
            status,
            epsilon_budget_nanos: self.epsilon_budget_nanos,
            delta_budget_femtos: self.delta_budget_femtos,
            end_date: self.end_date,
            granted_epsilon_nanos: 0,
            granted_delta_femtos: 0,
        };
        match (decision, self.status) {
            (
                Decision::Approve {
                    epsilon,
                    delta,
                    end_date,
                },
                Requested,
            ) => {
                if epsilon.as_nanos() > self.requested_epsilon_nanos
                    || delta.as_femtos() > self.requested_delta_femtos
                {
                    return Err(StoreError::InvalidRequest(
                        "approve at most the budget that was requested; a top-up can add more later, with a reason".into(),
                    ));
                }
                end_in_future(*end_date, today)?;
                Ok(Transition {
                    epsilon_budget_nanos: epsilon.as_nanos(),
                    delta_budget_femtos: delta.as_femtos(),
                    end_date: Some(*end_date),
                    granted_epsilon_nanos: epsilon.as_nanos(),
                    granted_delta_femtos: delta.as_femtos(),
                    ..to(Active)
                })
            }
            (Decision::Reject, Requested) => Ok(to(Rejected)),
            (Decision::Suspend, Active) => Ok(to(Suspended)),
            (Decision::Resume, Suspended) => Ok(to(Active)),
            (Decision::Revoke, Active | Suspended) => Ok(to(Revoked)),
            (Decision::TopUp { epsilon, delta }, status @ (Active | Suspended)) => Ok(Transition {
                epsilon_budget_nanos: checked_add(self.epsilon_budget_nanos, epsilon.as_nanos())?,
                delta_budget_femtos: checked_add(self.delta_budget_femtos, delta.as_femtos())?,
                granted_epsilon_nanos: epsilon.as_nanos(),
                granted_delta_femtos: delta.as_femtos(),
                ..to(status)
            }),
            // Every other pair is refused: a new decision or status is
            // invalid until a rule above allows it.
            (decision, status) => Err(StoreError::InvalidTransition {
                project: self.id.to_string(),
                status: status.as_str().into(),
                action: decision.action(),
            }),
        }
    }
}

/// What a project is left with once a charge is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub epsilon_remaining_nanos: i64,
    pub delta_remaining_femtos: i64,
}

impl Project {
    /// Whether this project may pay for `charge`, given what each of its
    /// datasets has spent over its lifetime (`used`, in the order of
    /// `charge.datasets`): queryable today on every dataset, within its ε
    /// and δ budgets, and within every dataset's lifetime caps. Checked in
    /// this order, so a project that cannot query is told that before
    /// anything about budgets.
    pub fn admit(
        &self,
        charge: &Charge<'_>,
        used: &[DatasetUsage],
    ) -> Result<Admitted, StoreError> {
        if charge.datasets.is_empty() || charge.datasets.len() != used.len() {
            return Err(StoreError::Corrupt(format!(
                "a charge for {} datasets with the usage of {}",
                charge.datasets.len(),
                used.len()
            )));
        }
        for d in charge.datasets {
            self.check_queryable(d.dataset, charge.today)?;
        }
        let (eps, delta) = (charge.epsilon.as_nanos(), charge.delta.as_femtos());
        if checked_add(self.epsilon_spent_nanos, eps)? > self.epsilon_budget_nanos {
            return Err(StoreError::BudgetExhausted {
                project: self.id.to_string(),
                cost: charge.epsilon.value(),
                remaining: self.remaining(),
            });
        }
        if checked_add(self.delta_spent_femtos, delta)? > self.delta_budget_femtos {
            return Err(StoreError::DeltaExhausted {
                project: self.id.to_string(),
                cost: charge.delta.value(),
                remaining: self.delta_remaining(),
            });
        }
        for (d, used) in charge.datasets.iter().zip(used) {
            if checked_add(used.epsilon_nanos, eps)? > d.epsilon.as_nanos()
                || checked_add(used.delta_femtos, delta)? > d.delta.as_femtos()
            {
                return Err(StoreError::LifetimeExhausted(d.dataset.to_owned()));
            }
        }
        Ok(Admitted {
            epsilon_remaining_nanos: self.epsilon_budget_nanos - self.epsilon_spent_nanos - eps,
            delta_remaining_femtos: self.delta_budget_femtos - self.delta_spent_femtos - delta,
        })
    }
}

impl ReleaseStatus {
    /// Where a held release stands after a review `action`, given how many
    /// distinct custodians (this one included) have now approved it and
    /// how many the policy requires (at least one). Only a held release
    /// can be reviewed.
    pub fn after(
        self,
        action: ReviewAction,
        approvers: u32,
        required: u8,
    ) -> Result<ReleaseStatus, ReleaseStatus> {
        if self != ReleaseStatus::Held {
            return Err(self);
        }
        Ok(match action {
            ReviewAction::Approve if approvers >= u32::from(required.max(1)) => {
                ReleaseStatus::Released
            }
            ReviewAction::Approve => ReleaseStatus::Held,
            ReviewAction::Reject => ReleaseStatus::Rejected,
            ReviewAction::RequestChanges => ReleaseStatus::ChangesRequested,
            ReviewAction::Withdraw => ReleaseStatus::Withdrawn,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Days, NaiveDate};
    use tre_core::{Delta, Epsilon, ProjectId, UserId};

    use super::*;
    use crate::Lifetime;
    use crate::ProjectStatus::{Active, Rejected, Requested, Revoked, Suspended};

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    fn today() -> NaiveDate {
        ok(NaiveDate::from_ymd_opt(2026, 6, 1).ok_or("date"))
    }

    fn project(status: ProjectStatus) -> Project {
        Project {
            id: ok(ProjectId::new("p1")),
            title: "t".into(),
            purpose: "p".into(),
            status,
            datasets: vec!["nhs_epr".into()],
            members: vec![ok(UserId::new("alice"))],
            requested_by: "alice".into(),
            requested_at: "2026-05-01T00:00:00Z".into(),
            requested_epsilon_nanos: 2_000_000_000,
            requested_delta_femtos: 1_000,
            requested_end: today(),
            epsilon_budget_nanos: 1_000_000_000,
            epsilon_spent_nanos: 0,
            delta_budget_femtos: 0,
            delta_spent_femtos: 0,
            end_date: None,
            history: vec![],
        }
    }

    fn decisions() -> Vec<Decision> {
        let end = today() + Days::new(30);
        vec![
            Decision::Approve {
                epsilon: ok(Epsilon::new(1.0)),
                delta: Delta::ZERO,
                end_date: end,
            },
            Decision::Reject,
            Decision::Suspend,
            Decision::Resume,
            Decision::Revoke,
            Decision::TopUp {
                epsilon: ok(Epsilon::new(0.5)),
                delta: Delta::ZERO,
            },
        ]
    }

    /// Issue #12: the state machine, status by decision, without SQLite.
    #[test]
    fn each_decision_moves_only_the_statuses_it_names() {
        let moves = |status| -> Vec<Option<ProjectStatus>> {
            decisions()
                .iter()
                .map(|d| {
                    project(status)
                        .transition(d, today())
                        .ok()
                        .map(|t| t.status)
                })
                .collect()
        };
        // approve, reject, suspend, resume, revoke, top up
        assert_eq!(
            moves(Requested),
            [Some(Active), Some(Rejected), None, None, None, None]
        );
        assert_eq!(
            moves(Active),
            [
                None,
                None,
                Some(Suspended),
                None,
                Some(Revoked),
                Some(Active)
            ]
        );
        assert_eq!(
            moves(Suspended),
            [
                None,
                None,
                None,
                Some(Active),
                Some(Revoked),
                Some(Suspended)
            ]
        );
        assert_eq!(moves(Rejected), [None; 6]);
        assert_eq!(moves(Revoked), [None; 6]);
        let refused = project(Revoked).transition(&Decision::Resume, today());
        assert!(matches!(
            refused,
            Err(StoreError::InvalidTransition {
                action: "resume",
                ..
            })
        ));
    }

    #[test]
    fn approval_grants_at_most_the_request_until_a_future_date() {
        let approve = |eps: f64, end: NaiveDate| Decision::Approve {
            epsilon: ok(Epsilon::new(eps)),
            delta: Delta::ZERO,
            end_date: end,
        };
        let later = today() + Days::new(10);
        let t = ok(project(Requested).transition(&approve(1.5, later), today()));
        assert_eq!(
            (t.epsilon_budget_nanos, t.end_date, t.granted_epsilon_nanos),
            (1_500_000_000, Some(later), 1_500_000_000)
        );
        for (eps, end) in [(2.5, later), (1.0, today() - Days::new(1))] {
            let r = project(Requested).transition(&approve(eps, end), today());
            assert!(matches!(r, Err(StoreError::InvalidRequest(_))), "{r:?}");
        }
    }

    #[test]
    fn a_top_up_adds_to_the_budget_and_cannot_overflow() {
        let top_up = Decision::TopUp {
            epsilon: ok(Epsilon::new(0.5)),
            delta: Delta::ZERO,
        };
        let t = ok(project(Active).transition(&top_up, today()));
        assert_eq!(
            (t.epsilon_budget_nanos, t.granted_epsilon_nanos),
            (1_500_000_000, 500_000_000)
        );
        let mut full = project(Active);
        full.epsilon_budget_nanos = i64::MAX;
        assert!(matches!(
            full.transition(&top_up, today()),
            Err(StoreError::InvalidRequest(_))
        ));
    }

    #[test]
    fn a_request_needs_a_purpose_members_and_a_future_end() {
        let good = ProjectRequest {
            id: ok(ProjectId::new("p2")),
            title: "Waiting times".into(),
            purpose: "how long patients wait".into(),
            datasets: vec!["nhs_epr".into()],
            epsilon: ok(Epsilon::new(1.0)),
            delta: Delta::ZERO,
            members: vec![ok(UserId::new("alice"))],
            end_date: today(),
            requested_by: ok(UserId::new("alice")),
        };
        ok(good.validate(today()));
        let mut bad = vec![good.clone(), good.clone(), good.clone()];
        bad[0].purpose = "  ".into();
        bad[1].members.clear();
        bad[2].end_date = today() - Days::new(1);
        for r in bad {
            assert!(matches!(
                r.validate(today()),
                Err(StoreError::InvalidRequest(_))
            ));
        }
    }

    fn charge<'a>(
        p: &'a Project,
        epsilon: f64,
        delta: f64,
        lifetimes: &'a [Lifetime<'a>],
    ) -> Charge<'a> {
        Charge {
            project: &p.id,
            datasets: lifetimes,
            user: &p.members[0],
            epsilon: ok(Epsilon::new(epsilon)),
            delta: ok(Delta::new(delta)),
            plan_hash: "h",
            today: today(),
        }
    }

    fn lifetime(dataset: &str, epsilon: f64) -> Lifetime<'_> {
        Lifetime {
            dataset,
            epsilon: ok(Epsilon::new(epsilon)),
            delta: ok(Delta::new(1e-3)),
        }
    }

    #[test]
    fn admission_checks_status_then_budgets_then_the_lifetime_cap() {
        let mut p = project(Active);
        p.end_date = Some(today() + Days::new(1));
        p.epsilon_spent_nanos = 600_000_000;
        p.delta_budget_femtos = 1_000;
        let none = [DatasetUsage::default()];
        let nhs = [lifetime("nhs_epr", 10.0)];
        let admitted = ok(p.admit(&charge(&p, 0.4, 0.0, &nhs), &none));
        assert_eq!(admitted.epsilon_remaining_nanos, 0, "exactly the budget");
        assert!(matches!(
            p.admit(&charge(&p, 0.5, 0.0, &nhs), &none),
            Err(StoreError::BudgetExhausted { .. })
        ));
        assert!(matches!(
            p.admit(&charge(&p, 0.1, 1e-9, &nhs), &none),
            Err(StoreError::DeltaExhausted { .. })
        ));
        let spent = [DatasetUsage {
            epsilon_nanos: 9_950_000_000,
            delta_femtos: 0,
        }];
        assert!(matches!(
            p.admit(&charge(&p, 0.1, 0.0, &nhs), &spent),
            Err(StoreError::LifetimeExhausted(_))
        ));
        // A project that cannot query is told so first.
        p.status = Suspended;
        assert!(matches!(
            p.admit(&charge(&p, 5.0, 0.0, &nhs), &spent),
            Err(StoreError::ProjectNotActive { .. })
        ));
    }

    /// Issue #15: a query across datasets needs every dataset approved and
    /// within every dataset's lifetime cap.
    #[test]
    fn a_charge_across_datasets_is_admitted_by_each() {
        let mut p = project(Active);
        p.end_date = Some(today() + Days::new(1));
        p.datasets.push("omop_demo".into());
        let both = [lifetime("nhs_epr", 10.0), lifetime("omop_demo", 1.0)];
        let fresh = [DatasetUsage::default(), DatasetUsage::default()];
        ok(p.admit(&charge(&p, 0.5, 0.0, &both), &fresh));
        let omop_spent = [
            DatasetUsage::default(),
            DatasetUsage {
                epsilon_nanos: 600_000_000,
                delta_femtos: 0,
            },
        ];
        assert!(matches!(
            p.admit(&charge(&p, 0.5, 0.0, &both), &omop_spent),
            Err(StoreError::LifetimeExhausted(d)) if d == "omop_demo"
        ));
        let other = [lifetime("nhs_epr", 10.0), lifetime("cprd", 10.0)];
        assert!(matches!(
            p.admit(&charge(&p, 0.5, 0.0, &other), &fresh),
            Err(StoreError::DatasetNotApproved { dataset, .. }) if dataset == "cprd"
        ));
        assert!(matches!(
            p.admit(&charge(&p, 0.5, 0.0, &both), &fresh[..1]),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_review_moves_only_a_held_release() {
        use ReleaseStatus::{ChangesRequested, Held, Rejected, Released, Withdrawn};
        assert_eq!(Held.after(ReviewAction::Approve, 1, 2), Ok(Held));
        assert_eq!(Held.after(ReviewAction::Approve, 2, 2), Ok(Released));
        assert_eq!(
            Held.after(ReviewAction::Approve, 1, 0),
            Ok(Released),
            "at least one"
        );
        assert_eq!(Held.after(ReviewAction::Reject, 0, 1), Ok(Rejected));
        assert_eq!(
            Held.after(ReviewAction::RequestChanges, 0, 1),
            Ok(ChangesRequested)
        );
        assert_eq!(Held.after(ReviewAction::Withdraw, 0, 1), Ok(Withdrawn));
        for s in [Released, Rejected, ChangesRequested, Withdrawn] {
            assert_eq!(s.after(ReviewAction::Approve, 5, 1), Err(s));
        }
    }
}
