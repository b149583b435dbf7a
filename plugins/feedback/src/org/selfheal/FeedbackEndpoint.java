package org.selfheal;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Properties;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;

/**
 * Labelled feedback on TorchServe's management port: {@code POST /feedback/{model}},
 * {@code GET /feedback/{model}} and {@code POST /feedback/{model}/quarantine}.
 *
 * <p>TorchServe checks the management token before a plugin runs, so only holders of the
 * management key reach this code. Feedback is not a worker's business: the plugin forwards it to
 * the model's selfheal learner process on loopback, which validates it, resolves prediction ids
 * and appends it to the feedback log, so no inference request waits behind feedback. The learner
 * announces itself in {@code selfheal/<model>.json} under TorchServe's working directory (its
 * port and a random secret, readable by this user only), read on every request: the credential
 * does not expire with TorchServe's tokens and survives key refreshes. Inference clients cannot
 * send feedback: the inference port has no feedback route and the learner answers only the
 * holder of the secret.
 *
 * <p>Limits: bodies over {@code selfheal_feedback_max_body} bytes (config.properties, default
 * 4 MiB) are refused with 413; the forward times out after 60 s (504).
 */
@Endpoint(
        urlPattern = "feedback",
        endpointType = EndpointTypes.MANAGEMENT,
        description = "selfheal: labelled feedback for a model (POST), its feedback status (GET), quarantine decisions")
public class FeedbackEndpoint extends ModelServerEndpoint {
    static final String SECRET_HEADER = "X-Selfheal-Secret";
    private static final Pattern ROUTE =
            Pattern.compile("^/feedback/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})(/quarantine)?/?$");
    private static final Pattern PORT = Pattern.compile("\"port\"\\s*:\\s*(\\d+)");
    private static final Pattern SECRET = Pattern.compile("\"secret\"\\s*:\\s*\"([0-9a-f]+)\"");
    private static final Duration TIMEOUT = Duration.ofSeconds(60);
    private static final int DEFAULT_MAX_BODY = 4 * 1024 * 1024;

    private final HttpClient client =
            HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).version(HttpClient.Version.HTTP_1_1).build();

    public FeedbackEndpoint() {
        RequestBodyFix.installWhenReady(); // TorchServe #2595: without it a POST body cannot be read
    }

    @Override
    public void doPost(Request req, Response res, Context ctx) throws IOException {
        String route = route(req, res, ctx);
        if (route == null) {
            return;
        }
        if (!RequestBodyFix.isInstalled()) {
            error(res, 503, "ServiceUnavailable", "the feedback endpoint is starting; retry");
            return;
        }
        int limit = intProperty(ctx.getConfig(), "selfheal_feedback_max_body", DEFAULT_MAX_BODY);
        byte[] body = readLimited(req.getInputStream(), limit);
        if (body == null) {
            error(res, 413, "PayloadTooLarge", "feedback body exceeds " + limit + " bytes");
            return;
        }
        if (body.length == 0) {
            error(res, 400, "BadRequest",
                    "empty body: send {\"feedback\": [{\"id\": ..., \"label\": k}]} or {\"instances\": [...], \"labels\": [...]}");
            return;
        }
        forward(res, route, body);
    }

    @Override
    public void doGet(Request req, Response res, Context ctx) throws IOException {
        String route = route(req, res, ctx);
        if (route == null) {
            return;
        }
        if (route.endsWith("/quarantine")) {
            error(res, 405, "MethodNotAllowed", "POST quarantine decisions; GET /feedback/{model} shows what is held");
            return;
        }
        forward(res, route, null);
    }

    @Override
    public void doPut(Request req, Response res, Context ctx) throws IOException {
        error(res, 405, "MethodNotAllowed", "use POST (send feedback) or GET (feedback status)");
    }

    @Override
    public void doDelete(Request req, Response res, Context ctx) throws IOException {
        doPut(req, res, ctx);
    }

    /** The learner's path for this request, "/feedback/{model}[/quarantine]"; null after answering 400/404. */
    private static String route(Request req, Response res, Context ctx) throws IOException {
        String path;
        try {
            path = URI.create(req.getRequestURI()).getRawPath();
        } catch (IllegalArgumentException e) {
            path = null;
        }
        Matcher m = ROUTE.matcher(path == null ? "" : path);
        if (!m.matches()) {
            error(res, 400, "BadRequest", "use /feedback/{model} with a model name of letters, digits, '_', '.', '-'");
            return null;
        }
        if (!ctx.getModels().containsKey(m.group(1))) {
            error(res, 404, "ModelNotFoundException", "model " + m.group(1) + " is not loaded");
            return null;
        }
        return "/feedback/" + m.group(1) + (m.group(2) == null ? "" : m.group(2));
    }

    /** Forwards to the learner: a POST with {@code body}, or a GET when it is null. */
    private void forward(Response res, String route, byte[] body) throws IOException {
        String model = route.split("/")[2];
        Learner learner = Learner.find(model);
        if (learner == null) {
            error(res, 503, "ServiceUnavailable", "feedback intake for model " + model
                    + " is not running (starting, or learner: off in its model-config); retry");
            return;
        }
        HttpRequest.Builder out = HttpRequest.newBuilder(URI.create("http://127.0.0.1:" + learner.port + route))
                .timeout(TIMEOUT)
                .header("Content-Type", "application/json")
                .header(SECRET_HEADER, learner.secret);
        out = body == null ? out.GET() : out.POST(HttpRequest.BodyPublishers.ofByteArray(body));
        HttpResponse<byte[]> answer;
        try {
            answer = client.send(out.build(), HttpResponse.BodyHandlers.ofByteArray());
        } catch (java.net.http.HttpTimeoutException e) {
            error(res, 504, "GatewayTimeout", "the learner did not answer within " + TIMEOUT.toSeconds() + " s");
            return;
        } catch (IOException e) {
            error(res, 503, "ServiceUnavailable", "cannot reach the learner of " + model + " (restarting?); retry");
            return;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            error(res, 503, "ServiceUnavailable", "interrupted");
            return;
        }
        res.setStatus(answer.statusCode());
        res.setContentType("application/json");
        try (OutputStream os = res.getOutputStream()) {
            os.write(answer.body());
        }
    }

    private static int intProperty(Properties config, String name, int fallback) {
        try {
            return Integer.parseInt(config.getProperty(name, String.valueOf(fallback)).trim());
        } catch (NumberFormatException e) {
            return fallback;
        }
    }

    /** The whole stream, or null when it is longer than {@code limit} bytes. */
    private static byte[] readLimited(InputStream in, int limit) throws IOException {
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        byte[] chunk = new byte[8192];
        int n;
        while ((n = in.read(chunk)) != -1) {
            if (buf.size() + n > limit) {
                return null;
            }
            buf.write(chunk, 0, n);
        }
        return buf.toByteArray();
    }

    private static void error(Response res, int code, String type, String message) throws IOException {
        res.setStatus(code);
        res.setContentType("application/json");
        String json = "{\"code\": " + code + ", \"type\": \"" + type + "\", \"message\": \"" + escape(message) + "\"}";
        try (OutputStream os = res.getOutputStream()) {
            os.write(json.getBytes(StandardCharsets.UTF_8));
        }
    }

    /** JSON string escaping, non-ASCII as \\uXXXX: every message is ASCII. */
    private static String escape(String s) {
        StringBuilder out = new StringBuilder();
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20 || c > 0x7e) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.toString();
    }

    /** The learner's announcement, selfheal/{model}.json in TorchServe's working directory (read per request). */
    static final class Learner {
        final int port;
        final String secret;

        private Learner(int port, String secret) {
            this.port = port;
            this.secret = secret;
        }

        static Learner find(String model) {
            Path file = Path.of(System.getProperty("user.dir"), "selfheal", model + ".json");
            try {
                String json = Files.readString(file);
                Matcher port = PORT.matcher(json);
                Matcher secret = SECRET.matcher(json);
                if (port.find() && secret.find()) {
                    return new Learner(Integer.parseInt(port.group(1)), secret.group(1));
                }
            } catch (IOException | NumberFormatException e) {
                return null;
            }
            return null;
        }
    }
}
