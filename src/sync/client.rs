//! `pier sync --server`: submits a job to a running Pier's admin API and
//! follows it to its end.

use std::time::Duration;

use serde_json::json;

use super::job::Job;
use super::show::Show;

/// How often the job is looked at.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// How long the server may fail to answer before `pier sync` gives up.
const KEEP_TRYING: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {server}: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("{server} has no admin API: set [admin] token on it")]
    NoAdminApi { server: String },
    #[error("{server} refused ({status}): {message}")]
    Refused {
        server: String,
        status: u16,
        message: String,
    },
    #[error("{server} answered with something that is not a sync job: {detail}")]
    Unexpected { server: String, detail: String },
}

/// The message of an OCI-style error body, or the body itself.
fn message_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// Submits `images` and shows the job until it ends; the job as it ended.
pub async fn submit_and_follow(
    server: &str,
    token: &str,
    images: &[String],
    platforms: &[String],
    show: &mut dyn Show,
) -> Result<Job, ClientError> {
    let server = server.trim_end_matches('/').to_owned();
    let token = token.trim();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| ClientError::Unreachable {
            server: server.clone(),
            detail: e.to_string(),
        })?;
    let unreachable = |e: reqwest::Error| ClientError::Unreachable {
        server: server.clone(),
        detail: e.to_string(),
    };
    let resp = http
        .post(format!("{server}/api/v1/sync"))
        .bearer_auth(token)
        .json(&json!({ "images": images, "platforms": platforms }))
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status();
    let body = resp.text().await.map_err(unreachable)?;
    // Without a token the server has no /api/ at all: any path there is
    // not found, as a path outside the registry API is.
    if status == reqwest::StatusCode::NOT_FOUND && body.contains("not a registry API path") {
        return Err(ClientError::NoAdminApi { server });
    }
    if status != reqwest::StatusCode::ACCEPTED {
        return Err(ClientError::Refused {
            server,
            status: status.as_u16(),
            message: message_of(&body),
        });
    }
    let id = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_owned))
        .ok_or_else(|| ClientError::Unexpected {
            server: server.clone(),
            detail: body.chars().take(300).collect(),
        })?;
    // The job outlives a replica; following it outlives a rolling
    // restart too.
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        let answer = match http
            .get(format!("{server}/api/v1/sync/{id}"))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(resp) => {
                let status = resp.status();
                resp.text().await.map(|body| (status, body))
            }
            Err(e) => Err(e),
        };
        let transient = match &answer {
            Err(_) => true,
            Ok((status, _)) => {
                status.is_server_error()
                    || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || *status == reqwest::StatusCode::REQUEST_TIMEOUT
            }
        };
        if transient {
            let since = *failing_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() < KEEP_TRYING {
                tokio::time::sleep(POLL_EVERY * 2).await;
                continue;
            }
        }
        let (status, body) = answer.map_err(unreachable)?;
        failing_since = None;
        if !status.is_success() {
            return Err(ClientError::Refused {
                server,
                status: status.as_u16(),
                message: message_of(&body),
            });
        }
        let job = Job::from_json(body.as_bytes()).ok_or_else(|| ClientError::Unexpected {
            server: server.clone(),
            detail: body.chars().take(300).collect(),
        })?;
        show.show(&job);
        if job.state.finished() {
            return Ok(job);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
